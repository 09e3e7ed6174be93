"""Teacher-forced scoring of GGUF files in llama.cpp, run as a script with the llama.cpp
environment's python (llama-cpp-python built from source, numpy; no torch, nothing from bakery).

Input (a JSON file, first argument)::

    {"runs": [{"name": "bake", "gguf": "/abs/model.gguf", "prompts": [[ids], ...],
               "cvec": {"file": "/abs/cvec.f32", "il_start": 15, "il_end": 15}}, ...],
     "prompts": [[token ids], ...], "n_ctx": 512, "n_threads": 2, "n_gpu_layers": 0,
     "extra_bufts": false}

A run's own ``prompts`` replace the shared ones. ``cvec`` (optional) is llama.cpp's own runtime
control vector, applied with ``llama_set_adapter_cvec``: the file holds raw float32 values, an
``n_embd x (n_layer - 1)`` buffer that starts at block 1 (block ``il`` at offset
``(il - 1) * n_embd``; llama.cpp has no control vector for block 0), applied to blocks
``il_start..il_end``. Runs of the same GGUF share one loaded model, in the order given.

``extra_bufts`` (default false) turns on llama.cpp's extra CPU buffer types. They are off by
default because llama-cpp-python 0.3.36 built with native tuning on a CPU with AMX segfaulted in
``llama_decode`` on any batch of more than one token of a Q4_1 model with them on (its AMX
kernels); the plain CPU kernels compute the same graph.

Output (a JSON file, second argument)::

    {"llama_cpp_version": "0.3.36", "runs": {"bake": {"load_seconds": 0.4, "run_seconds": 1.2,
       "n_params": 134516288, "file_type": "...", "prompts": [{"logprob": [null, -1.2, ...],
       "top1": [null, 42, ...]}, ...]}}}

``logprob[t]`` is the log-probability of token ``t`` after tokens ``< t`` (all logits on);
``top1[t]`` the token llama.cpp ranks first there; position 0 has no prediction (``null``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

# Run as a script, this file's folder comes first on sys.path; it holds bakery's engine modules
# (vllm.py, transformers.py...), which must not shadow real packages.
_HERE = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _HERE]


def _log(msg: str) -> None:
    print(f"[llamacpp_worker] {msg}", file=sys.stderr, flush=True)


def _score(llm, prompts: list[list[int]]) -> list[dict]:
    import numpy as np

    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        pred = logits[:-1]
        actual = pred[np.arange(len(ids) - 1), np.asarray(ids[1:])] - lse[:-1]
        out.append({"logprob": [None] + [float(x) for x in actual],
                    "top1": [None] + [int(x) for x in pred.argmax(-1)]})
    return out


def _set_cvec(llm, cvec: dict | None, n_embd: int) -> None:
    import llama_cpp
    import numpy as np

    if cvec is None:
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)
    else:
        data = np.ascontiguousarray(np.fromfile(cvec["file"], dtype=np.float32))
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, data.size, n_embd, int(cvec["il_start"]),
                                              int(cvec["il_end"]))
    if rc != 0:
        raise RuntimeError(f"llama_set_adapter_cvec returned {rc} (n_embd {n_embd}, {cvec})")


def _load(path: str, spec: dict):
    """``Llama`` with all logits on. ``extra_bufts`` false (the default) keeps llama.cpp's extra CPU
    buffer types (AMX, weight repacking) off: ``Llama()`` has no argument for the model parameter
    ``use_extra_bufts``, so the default-parameters function is wrapped while the model loads."""
    import llama_cpp.llama as high
    from llama_cpp import Llama

    default = high.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = bool(spec.get("extra_bufts", False))
        return p

    high.llama_cpp.llama_model_default_params = params
    try:
        return Llama(model_path=path, logits_all=True, n_ctx=int(spec.get("n_ctx", 512)),
                     n_batch=int(spec.get("n_ctx", 512)), n_threads=spec.get("n_threads"),
                     n_threads_batch=spec.get("n_threads"), n_gpu_layers=int(spec.get("n_gpu_layers", 0)),
                     seed=0, verbose=False)
    finally:
        high.llama_cpp.llama_model_default_params = default


def run(spec: dict) -> dict:
    import llama_cpp

    out: dict = {"llama_cpp_version": llama_cpp.__version__, "runs": {},
                 "extra_bufts": bool(spec.get("extra_bufts", False))}
    llm, loaded_path = None, None
    for r in spec["runs"]:
        t0 = time.time()
        if r["gguf"] != loaded_path:
            if llm is not None:
                llm.close()
            llm, loaded_path = _load(r["gguf"], spec), r["gguf"]
        t1 = time.time()
        n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
        _set_cvec(llm, r.get("cvec"), n_embd)
        prompts = r.get("prompts") or spec["prompts"]
        scores = _score(llm, prompts)
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(llm.model, desc, 256)
        out["runs"][r["name"]] = {"load_seconds": round(t1 - t0, 2), "run_seconds": round(time.time() - t1, 2),
                                  "n_params": int(llama_cpp.llama_model_n_params(llm.model)),
                                  "desc": desc.value.decode(errors="replace"), "prompts": scores}
        _log(f"{r['name']}: {'loaded in %.1fs, ' % (t1 - t0) if t1 - t0 > 0.01 else ''}scored "
             f"{len(prompts)} sequences in {time.time() - t1:.1f}s"
             f"{' with a control vector' if r.get('cvec') else ''}")
    if llm is not None:
        llm.close()
    return out


if __name__ == "__main__":  # worker_io by path: this folder is off sys.path (its vllm.py would shadow vLLM)
    import runpy

    runpy.run_path(os.path.join(_HERE, "worker_io.py"))["serve"](run, sys.argv)
