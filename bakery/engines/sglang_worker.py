"""Teacher-forced scoring in a real sglang engine, run as a script with sglang's venv python.

sglang pins its own transformers and needs stand-ins for two CUDA-only imports, so it lives in its
own virtual environment (``scripts/install-sglang.sh``) and this file runs there as a subprocess
(:mod:`bakery.engines.sglang` starts it with ``BAKERY_SGLANG_STUB`` and ``SGLANG_USE_CPU_ENGINE=1``
set). It imports nothing from bakery.

Input (a JSON file, first argument)::

    {"engines": [{"name": "bake0-native", "path": "/abs/dir", "impl": "auto",
                  "prompts": [[ids], ...]}, ...],
     "prompts": [[token ids], ...], "dtype": "float32"}

``impl`` is sglang's ``model_impl``: ``auto`` (its native model class where it has one) or
``transformers`` (its Transformers backend, the ``--model-impl transformers`` launch flag). An
engine's own ``prompts`` replace the shared ones, and its ``engine_args`` (a dict) are passed to
``sgl.Engine`` over the defaults below.

Output (a JSON file, second argument)::

    {"sglang_version": "...", "engines": {"bake0-native": {"load_seconds": 27.0, "run_seconds": 0.4,
       "prompts": [{"logprob": [null, -1.2, ...], "top1": [null, 42, ...]}, ...]}}}

``logprob[t]`` is the log-probability sglang gives the actual token ``t`` after tokens ``< t``
(its prompt log-probs: ``return_logprob=True, logprob_start_len=0``); ``top1[t]`` the token it
ranks first there. Position 0 has no prediction (``null``). Engines start one after another in
this process, each shut down before the next. With ``"keep_going": true`` in the input, an engine
that fails to start or to score is recorded as ``{"error": "ExceptionType: message"}`` and the
next one runs (the per-architecture tests use it to record what sglang refuses to load). A failure
after the engine has started (in a forward) still ends the worker: sglang's running-phase handler
stops the whole process tree.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import time

# Run as a script, this file's folder comes first on sys.path; it holds bakery's engine modules
# (sglang.py, transformers.py, ...) that would shadow the real packages: drop it.
_HERE = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _HERE]


def _score(engine, prompts: list[list[int]]) -> list[dict]:
    outs = engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                           return_logprob=True, logprob_start_len=0, top_logprobs_num=1)
    result = []
    for ids, out in zip(prompts, outs):
        meta = out["meta_info"]
        lps = [None if e[0] is None else float(e[0]) for e in meta["input_token_logprobs"]]
        tops = [int(e[0][1]) if e else None for e in meta["input_top_logprobs"]]
        tops = [None if lp is None else t for lp, t in zip(lps, tops)]
        if len(lps) != len(ids) or [e[1] for e in meta["input_token_logprobs"]] != ids:
            raise RuntimeError(f"sglang returned log-probs for {len(lps)} tokens, not the {len(ids)} prompt "
                               "tokens it was given")
        result.append({"logprob": lps, "top1": tops})
    return result


def run(spec: dict) -> dict:
    import sglang as sgl

    out = {"sglang_version": sgl.__version__, "engines": {}}
    for e in spec["engines"]:
        if spec.get("keep_going"):
            start = _stderr_size()
            try:
                _run_one(sgl, spec, e, out, custom_sigquit_handler=_child_failed)
            except BaseException as exc:  # noqa: BLE001  (a load failure is a result here)
                msg = f"{type(exc).__name__}: {exc}"
                cause = _last_error_since(start)
                if cause:
                    msg = f"{cause} (in the engine's process; here {type(exc).__name__}: {str(exc)[:80]})"
                elif _CHILD_ERRORS:
                    msg = f"{msg} ({_CHILD_ERRORS[-1]})"
                _CHILD_ERRORS.clear()
                _kill_children()
                out["engines"][e["name"]] = {"error": msg[-2000:]}
                print(f"[sglang_worker] {e['name']} (model_impl={e.get('impl', 'auto')}): FAILED: {msg[-300:]}",
                      file=sys.stderr, flush=True)
                gc.collect()
        else:
            _run_one(sgl, spec, e, out)
    return out


_CHILD_ERRORS: list[str] = []


def _child_failed(signum, frame) -> None:
    """sglang's own handler for a child's SIGQUIT kills this whole process tree; with keep_going
    the failed start raises in ``sgl.Engine`` instead (its pipe to the child closes)."""
    _CHILD_ERRORS.append("SIGQUIT from a child process")


def _stderr_size() -> int:
    try:
        return os.fstat(2).st_size
    except OSError:
        return 0


def _last_error_since(start: int) -> str | None:
    """The last ``SomethingError: message`` line the engine's processes wrote to the shared stderr
    (a file when bakery runs the worker) since ``start``: the real reason a start failed."""
    try:
        with open("/proc/self/fd/2", errors="replace") as f:
            f.seek(start)
            lines = f.read().splitlines()
    except OSError:
        return None
    hits = [ln.strip() for ln in lines if re.match(r"^\s*[A-Za-z_.]*(Error|Exception|Interrupt)\b.*", ln)
            and not ln.lstrip().startswith("Traceback")]
    return hits[-1][:1000] if hits else None


def _kill_children() -> None:
    """What a failed engine start leaves behind: this worker's child processes (and only those)."""
    try:
        from sglang.srt.utils.common import kill_process_tree
        kill_process_tree(os.getpid(), include_parent=False)
    except Exception as exc:  # noqa: BLE001
        print(f"[sglang_worker] could not stop the failed engine's processes: {exc}", file=sys.stderr, flush=True)


def _run_one(sgl, spec: dict, e: dict, out: dict, **engine_kw) -> None:
    t0 = time.time()
    kw = {"attention_backend": "torch_native", **engine_kw, **e.get("engine_args", {})}
    engine = sgl.Engine(model_path=e["path"], device="cpu", skip_tokenizer_init=True,
                        dtype=spec.get("dtype", "float32"),
                        model_impl=e.get("impl", "auto"), mem_fraction_static=0.5,
                        max_total_tokens=int(spec.get("max_total_tokens", 4096)),
                        **({"context_length": int(spec["context_length"])} if spec.get("context_length") else {}),
                        disable_cuda_graph=True, trust_remote_code=False, random_seed=0,
                        log_level="error", **kw)
    loaded = time.time()
    prompts = e.get("prompts") or spec["prompts"]
    try:
        res = _score(engine, prompts)
    finally:
        engine.shutdown()
    out["engines"][e["name"]] = {"load_seconds": round(loaded - t0, 2),
                                 "run_seconds": round(time.time() - loaded, 2), "prompts": res}
    print(f"[sglang_worker] {e['name']} (model_impl={e.get('impl', 'auto')}): started in {loaded - t0:.1f}s, "
          f"scored {len(prompts)} prompts in {time.time() - loaded:.1f}s", file=sys.stderr, flush=True)
    del engine
    gc.collect()


if __name__ == "__main__":  # worker_io by path: this folder is off sys.path (its vllm.py would shadow vLLM)
    import runpy

    runpy.run_path(os.path.join(_HERE, "worker_io.py"))["serve"](run, sys.argv, hard_exit=True)
