"""Teacher-forced scoring and sampling in vLLM, run as a script with the vLLM environment's python.

vLLM pins an older transformers than bakery, so it lives in its own virtual environment and this
file is run there as a subprocess (``bakery.engines.vllm`` does that). It imports nothing from bakery.

Input (a JSON file, first argument)::

    {"models": [{"name": "bake", "path": "/abs/dir", "prompts": [[ids], ...]}, ...],
     "prompts": [[token ids], ...], "dtype": "float32", "max_model_len": 1024}

(a model's own ``prompts`` replace the shared ones for that model)

Output (a JSON file, second argument)::

    {"vllm_version": "...", "models": {"bake": {"load_seconds": 31.2, "run_seconds": 0.8,
       "prompts": [{"logprob": [null, -1.2, ...], "top1": [null, 42, ...]}, ...]}}}

``logprob[t]`` is the log-probability vLLM gives the actual token ``t`` after tokens ``< t``;
``top1[t]`` is the token it ranks first there. Position 0 has no prediction (``null``).

With ``"sample": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 48, "seed": 0}`` in the input
the worker samples instead: one request per prompt, the engine seeded with ``seed``, and
each model's entry holds ``"samples": [{"token_ids": [...], "finish_reason": "stop"}, ...]``;
``"logprobs": K`` there adds ``"topk_ids"``/``"topk_logprobs"`` (K per generated token, best
first, from the raw distribution before temperature and top-p) to each sample (the distilled bakers' teacher, where the exact bias bake is the steered model). Models are
loaded one after another in the same process, so vLLM starts once per run, not per model.
"""

from __future__ import annotations

import gc
import os
import sys
import time

# Run as a script, this file's folder comes first on sys.path. It holds bakery's engine modules
# vllm.py and transformers.py, which would shadow the real packages: drop it.
_HERE = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _HERE]


def _score(llm, prompts: list[list[int]]) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    result = []
    for ids, out in zip(prompts, outs):
        lps, tops = [], []
        for t, entry in enumerate(out.prompt_logprobs or []):
            if entry is None:
                lps.append(None)
                tops.append(None)
                continue
            actual = entry.get(ids[t])
            lps.append(None if actual is None else float(actual.logprob))
            top = min(entry.items(), key=lambda kv: kv[1].rank)
            tops.append(int(top[0]))
        result.append({"logprob": lps, "top1": tops})
    return result


def _sample(llm, prompts: list[list[int]], cfg: dict) -> list[dict]:
    from vllm import SamplingParams

    # one engine-wide seed (LLM(seed=...)): per-request seeds make vLLM sample request by request
    k = int(cfg.get("logprobs") or 0)
    params = SamplingParams(temperature=float(cfg.get("temperature", 1.0)), top_p=float(cfg.get("top_p", 1.0)),
                            max_tokens=int(cfg["max_tokens"]), logprobs=k or None)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        row = {"token_ids": list(c.token_ids), "finish_reason": c.finish_reason}
        if k:  # each entry holds the top k and the sampled token (which may rank below k)
            best = [sorted(e.items(), key=lambda kv: kv[1].rank)[:k] for e in c.logprobs]
            row["topk_ids"] = [[int(t) for t, _ in b] for b in best]
            row["topk_logprobs"] = [[float(lp.logprob) for _, lp in b] for b in best]
        result.append(row)
    return result


def run(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM

    out = {"vllm_version": vllm.__version__, "models": {}}
    for model in spec["models"]:
        t0 = time.time()
        llm = LLM(model=model["path"], dtype=spec.get("dtype", "float32"),
                  max_model_len=int(spec.get("max_model_len", 1024)), enforce_eager=True,
                  seed=int((spec.get("sample") or {}).get("seed", 0)), enable_prefix_caching=False,
                  trust_remote_code=bool(spec.get("trust_remote_code", False)))
        loaded = time.time()
        prompts = model.get("prompts") or spec["prompts"]
        if spec.get("sample"):
            res = {"samples": _sample(llm, prompts, spec["sample"])}
            what = "sampled"
        else:
            res = {"prompts": _score(llm, prompts)}
            what = "scored"
        out["models"][model["name"]] = {"load_seconds": round(loaded - t0, 2),
                                        "run_seconds": round(time.time() - loaded, 2), **res}
        print(f"[vllm_worker] {model['name']}: loaded in {loaded - t0:.1f}s, {what} "
              f"{len(prompts)} prompts in {time.time() - loaded:.1f}s", file=sys.stderr, flush=True)
        del llm
        gc.collect()
    return out


if __name__ == "__main__":  # worker_io by path: this folder is off sys.path (its vllm.py would shadow vLLM)
    import runpy

    runpy.run_path(os.path.join(_HERE, "worker_io.py"))["serve"](run, sys.argv, hard_exit=True)
