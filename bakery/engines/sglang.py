"""sglang (a real run, in its own virtual environment), with its loading rules as the explanation.

``bakery verify --engine sglang`` loads each export in a real sglang engine on the CPU (sglang
0.5.23, built by ``make sglang``; :mod:`bakery.engines.sglang_worker` runs in that venv) twice:
with sglang's native model class (``model_impl="auto"``) and with its Transformers backend (the
launch flag ``--model-impl transformers``), plus the unedited base model both ways for the noise
floor. The steered model's trajectories are fed to it as prompts and the prompt log-probs (of the
actual and the top-1 token) are compared with transformers at every response position, float32
in both, with the vLLM check's metric and thresholds (:mod:`bakery.engines.vllm`). The verdict
passes when the native class passes (no flag), or else when the Transformers backend passes (the
verdict's ``launch_flag`` says so), and says which ran and how each did.

The rules (read from sglang 0.5.23's code, shared/ENGINES.md, and confirmed by these runs):
sglang builds a bias only where its native model class does, and silently discards any ``*.bias``
tensor that has no matching parameter; its Transformers backend builds exactly what transformers
builds. They explain a failed native run, and stand in when sglang is not installed: a verdict of
kind ``rules``, labelled "rules only (not run)", which can fail (a bias no sglang model builds) but
never pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bakery.engines.exported import nonzero_biases, transformers_param_names
from bakery.engines.runner import find_engine_python, run_worker
from bakery.engines.setup import Setup, joined_rows
from bakery.engines.verdict import RULES_ONLY, EngineNotInstalled, Verdict

FLAG = "--model-impl transformers"
SGLANG_VERSION = "0.5.23"
REPO_ROOT = Path(__file__).resolve().parents[2]
STUB = Path(__file__).with_name("sglang_stub.py")
WORKER = Path(__file__).with_name("sglang_worker.py")
INSTALL_SGLANG = ("run `make sglang` in the bakery checkout (scripts/install-sglang.sh creates "
                  ".venv-sglang; the Makefile exports BAKERY_SGLANG_PYTHON), or set BAKERY_SGLANG_PYTHON "
                  "to the python of a venv built by that script")
# The two implementations each export is run with: label -> sglang's model_impl.
IMPLS = {"native": "auto", "transformers": "transformers"}


@dataclass
class RuleCheck:
    """What sglang's loading rules say about an export (nothing ran)."""

    status: str  # ok | needs-flag | fail | unknown
    flag: str | None = None
    reasons: list[str] = field(default_factory=list)
    native_dropped: list[str] = field(default_factory=list)  # non-zero biases the native model drops
    lost: list[str] = field(default_factory=list)  # non-zero biases no sglang model builds

    def summary(self) -> str:
        if self.status == "needs-flag":
            return f"launch with `{self.flag}`: " + "; ".join(self.reasons)
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "flag": self.flag, "reasons": self.reasons,
                "native_dropped": self.native_dropped, "lost": self.lost,
                "rules": f"sglang {SGLANG_VERSION} (shared/ENGINES.md)"}


# ---- which biases each native sglang model class builds ---------------------------------------
_ATTN = r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias$"
_QKV = r"\.self_attn\.(q_proj|k_proj|v_proj)\.bias$"


def _attn_if_flag(cfg: dict) -> list[str]:
    return [_ATTN] if cfg.get("attention_bias") or cfg.get("bias") else []


NATIVE: dict[str, Callable[[dict], list[str]]] = {
    # Llama-style code: q/k/v/o biases follow attention_bias; the MLP is built with bias=False.
    "LlamaForCausalLM": _attn_if_flag,
    "MistralForCausalLM": _attn_if_flag,
    "Phi3ForCausalLM": _attn_if_flag,
    "Qwen3ForCausalLM": _attn_if_flag,
    "Qwen3MoeForCausalLM": _attn_if_flag,
    "Gemma2ForCausalLM": _attn_if_flag,
    "Gemma3ForCausalLM": _attn_if_flag,
    "Olmo2ForCausalLM": _attn_if_flag,
    # Qwen2: q/k/v always biased, o_proj and the MLP never.
    "Qwen2ForCausalLM": lambda cfg: [_QKV],
    # Granite: no bias anywhere in sglang's granite.py (MLP, qkv_proj and o_proj: bias=False); the
    # MLP bias measured dropped (tests/test_sglang_architectures.py).
    "GraniteForCausalLM": lambda cfg: [],
    # Always-biased or natively biased families: every bias is built.
    "GPT2LMHeadModel": lambda cfg: [r"\.bias$"],
    "GPTNeoXForCausalLM": lambda cfg: [r"\.bias$"],
    "GptOssForCausalLM": lambda cfg: [r"\.bias$"],
    "ApertusForCausalLM": lambda cfg: [r"\.bias$"],
}


# Where the launch flag does not help: sglang 0.5.23's Transformers backend, measured on tiny models
# (tests/test_sglang_architectures.py, docs/architectures.md "sglang runs per architecture").
FLAG_BROKEN: dict[str, str] = {
    "GraniteForCausalLM": f"with {FLAG} the unedited Granite model already differs from transformers (its "
                          "Transformers backend reads `logit_scale`, not Granite's `logits_scaling`)",
    "Olmo3ForCausalLM": f"with {FLAG} OLMo-3 fails to start (sglang's Olmo3Config has no rope_parameters)",
    "OlmoeForCausalLM": f"with {FLAG} OLMoE fails to start (Unsupported TP style 'colwise_gather_output')",
    "MixtralForCausalLM": f"with {FLAG} Mixtral fails to start (no module named "
                          "'model.layers.0.block_sparse_moe' in TransformersMoEForCausalLM)",
}


def check(folder: str | Path, *, transformers_names: set[str] | None = None) -> RuleCheck:
    """The rules' reading of serving ``folder`` with sglang: ok, needs-flag (with the flag), fail or unknown."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    biases = nonzero_biases(folder)
    if not biases:
        return RuleCheck("ok", reasons=["no non-zero bias tensors: nothing a loader could drop"])
    if transformers_names is None:
        transformers_names = transformers_param_names(folder)
    rules = NATIVE.get(arch)
    lost = [b for b in biases if b not in transformers_names]
    if lost:
        return RuleCheck(
            "fail", lost=lost,
            reasons=[f"{len(lost)} non-zero bias tensor(s) (e.g. {lost[0]}) have no parameter in "
                     f"{arch} with this config.json: sglang discards them silently, with or without "
                     f"{FLAG}. The config flag that creates them is off (for Llama: mlp_bias / "
                     "attention_bias); re-bake with bakery, which sets it."])
    if rules is None and arch in FLAG_BROKEN:
        return RuleCheck("unknown", reasons=[f"bakery has no sglang rules for {arch}, and {FLAG_BROKEN[arch]}"])
    if rules is None:
        return RuleCheck(
            "unknown", reasons=[f"bakery has no sglang rules for {arch}; {FLAG} builds what "
                                "transformers builds, so it is the safe launch flag"], flag=FLAG)
    patterns = [re.compile(p) for p in rules(config)]
    dropped = [b for b in biases if not any(p.search(b) for p in patterns)]
    if not dropped:
        return RuleCheck("ok", reasons=[f"sglang's native {arch} builds every non-zero bias"])
    if arch in FLAG_BROKEN:
        return RuleCheck(
            "fail", native_dropped=dropped, lost=dropped,
            reasons=[f"sglang's native {arch} has no parameter for {len(dropped)} non-zero bias tensor(s) "
                     f"(e.g. {dropped[0]}) and drops them silently, and {FLAG_BROKEN[arch]}: no sglang "
                     "launch keeps this bake; use --route rank1 or --method kl-lora"])
    return RuleCheck(
        "needs-flag", flag=FLAG, native_dropped=dropped,
        reasons=[f"sglang's native {arch} has no parameter for {len(dropped)} non-zero bias tensor(s) "
                 f"(e.g. {dropped[0]}) and would drop them silently; its Transformers backend keeps them"])


def rules_verdict(export: str | Path, note: str = "") -> Verdict:
    """The fallback when sglang is not installed: rules only (not run). A rule violation fails;
    anything else is not run."""
    v = check(export)
    msg = f"{note}{RULES_ONLY}: sglang {SGLANG_VERSION} loading rules: {v.summary()}"
    status = "fail" if v.status == "fail" else "not-run"
    return Verdict("sglang", status, msg, launch_flag=v.flag, details={"rules": v.to_dict()}, kind="rules")


def missing_verdict(setup: Setup, error: EngineNotInstalled) -> Verdict:
    """What ``verify --engine all`` reports for an export when sglang is not installed."""
    return rules_verdict(setup.export, note=f"{error} ")


# ---- the runner -----------------------------------------------------------------------------------
def find_sglang_python() -> Path:
    """The python of sglang's venv: $BAKERY_SGLANG_PYTHON, else .venv-sglang/bin/python in the
    checkout or the working directory. Raises :class:`EngineNotInstalled` with how to install it."""
    return find_engine_python("sglang", "BAKERY_SGLANG_PYTHON", ".venv-sglang", INSTALL_SGLANG, REPO_ROOT)


def score_token_ids(engines: Sequence[dict], prompts: list[list[int]], *, python: Path | None = None,
                    timeout: float = 1800, log=None, dtype: str = "float32",
                    keep_going: bool = False) -> dict[str, Any]:
    """Score ``prompts`` teacher-forced in one sglang engine per entry of ``engines`` (``{"name",
    "path", "impl": "auto"|"transformers"[, "prompts"]}``), one after another in one worker process.
    Returns the worker's output (:mod:`bakery.engines.sglang_worker`) plus ``wall_seconds``. With
    ``keep_going``, an engine that fails to load is recorded (``{"error": ...}``) and the rest run."""
    python = python or find_sglang_python()
    spec = {"engines": [{**e, "path": str(Path(e["path"]).resolve())} for e in engines], "prompts": prompts,
            "dtype": dtype, "keep_going": keep_going}
    env = {"BAKERY_SGLANG_STUB": str(STUB), "SGLANG_USE_CPU_ENGINE": "1"}
    return run_worker(WORKER, spec, python=python, timeout=timeout, engine="sglang", module="sglang",
                      install=INSTALL_SGLANG, env=env, log=log)


# ---- the check ------------------------------------------------------------------------------------
def verify_sglang(setups: Sequence[Setup], *, log=None, timeout: float = 1800) -> list[Verdict]:
    """One verdict per export, from a real sglang run: each export and each base model started once
    per implementation (native, Transformers backend), all in one worker process."""
    from bakery.engines.scores import tf_scores
    from bakery.models import load_model

    python = find_sglang_python()
    all_rows, spans = joined_rows(setups)
    engines, base_of = engine_plan([(s.export, s.base_dir, [r[0] for r in all_rows[a:b]])
                                    for s, (a, b) in zip(setups, spans)])
    res = score_token_ids(engines, [], python=python, timeout=timeout, log=log)
    verdicts = []
    for i, (s, (a, b)) in enumerate(zip(setups, spans)):
        rows = all_rows[a:b]
        tf = {"steered": tf_scores(s.base, rows, s.ref.context(s.base)), "base": tf_scores(s.base, rows),
              "bake": tf_scores(load_model(s.export), rows)}
        name, o = base_of[i]
        runs = {k: (res["engines"][f"bake{i}-{k}"]["prompts"],
                    res["engines"][f"{name}-{k}"]["prompts"][o:o + b - a]) for k in IMPLS}
        verdicts.append(_verdict(s, rows, runs, tf, res))
    return verdicts


def engine_plan(exports: Sequence[tuple[Path, Path, list[list[int]]]]) -> tuple[list[dict], list[tuple[str, int]]]:
    """The engines to start for ``(export, base, token-id rows)`` triples: each export and each
    distinct base once per implementation. A base scores the rows of its own exports only (their
    ids are in its vocabulary). Returns the worker's engine list and, per export, (its base's
    engine name prefix, the offset of its rows among that base's rows)."""
    engines: list[dict] = []
    names: dict[str, str] = {}
    base_rows: dict[str, list[list[int]]] = {}
    base_of: list[tuple[str, int]] = []
    for i, (export, base, rows) in enumerate(exports):
        engines += [{"name": f"bake{i}-{k}", "path": str(export), "impl": impl, "prompts": rows}
                    for k, impl in IMPLS.items()]
        key = str(base)
        names.setdefault(key, f"base{len(names)}")
        base_of.append((names[key], len(base_rows.setdefault(key, []))))
        base_rows[key].extend(rows)
    for key, name in names.items():
        engines += [{"name": f"{name}-{k}", "path": key, "impl": impl, "prompts": base_rows[key]}
                    for k, impl in IMPLS.items()]
    return engines, base_of


def _measure(s: Setup, rows, bake, base, tf: dict, target_name: str) -> dict[str, Any]:
    """One implementation's figures against the target, and whether they pass (vLLM's thresholds)."""
    from bakery.engines.scores import gap
    from bakery.engines.vllm import VLLM_GAP_RATIO, VLLM_TOP1

    target = tf["steered"] if s.manifest.exact else tf["bake"]
    d: dict[str, Any] = {
        "bake_vs_target": gap(bake, target, rows), "bake_vs_steered": gap(bake, tf["steered"], rows),
        "bake_vs_transformers_bake": gap(bake, tf["bake"], rows),
        "noise_floor_base_sglang_vs_transformers": gap(base, tf["base"], rows),
        "unedited_vs_target": gap(base, target, rows), "bake_vs_base_in_sglang": gap(bake, base, rows)}
    bt, un, nf = d["bake_vs_target"], d["unedited_vs_target"], d["noise_floor_base_sglang_vs_transformers"]
    d["gap_ratio"] = bt["mean_abs_logprob_gap"] / max(un["mean_abs_logprob_gap"], 1e-12)
    limit = VLLM_GAP_RATIO * un["mean_abs_logprob_gap"]
    d["passed"] = bt["top1"] >= VLLM_TOP1 and bt["mean_abs_logprob_gap"] < limit
    d["lost"] = d["bake_vs_base_in_sglang"]["mean_abs_logprob_gap"] < limit
    d["line"] = (f"vs {target_name}: top-1 {bt['top1']:.4f}, mean |Δlogprob| {bt['mean_abs_logprob_gap']:.5f} = "
                 f"{d['gap_ratio']:.4f} x the unedited model's (top-1 {un['top1']:.3f}, "
                 f"{un['mean_abs_logprob_gap']:.4f}; noise floor, unedited sglang vs transformers: top-1 "
                 f"{nf['top1']:.4f}, {nf['mean_abs_logprob_gap']:.5f}) on {bt['positions']} response positions")
    if not d["passed"]:
        d["why"] = (f"sglang lost the edit: the loaded bake scores like the unedited model (mean |Δlogprob| "
                    f"{d['bake_vs_base_in_sglang']['mean_abs_logprob_gap']:.5f} to it)" if d["lost"] else
                    f"its outputs differ from {target_name} by more than allowed (top-1 >= {VLLM_TOP1} and "
                    f"mean |Δlogprob| < {VLLM_GAP_RATIO} x the unedited model's gap = {limit:.4f})")
    return d


def _verdict(s: Setup, rows, runs: dict, tf: dict, res: dict) -> Verdict:
    """``runs``: implementation label (a key of IMPLS; one or both) -> (bake's scores, base's)."""
    target_name = "the bake in transformers"
    if s.manifest.exact:
        target_name = "transformers runtime ablation" if s.ref.ablation else "transformers runtime steering"
    m = {k: _measure(s, rows, bake, base, tf, target_name) for k, (bake, base) in runs.items()}
    rules = check(s.export)
    arch = (json.loads((s.export / "config.json").read_text()).get("architectures") or ["?"])[0]
    names = {"native": f"native {arch} (model_impl auto)", "transformers": f"`{FLAG}`"}
    parts = []
    for k, d in m.items():
        if d["passed"]:
            parts.append(f"{names[k]}: pass, {d['line']}")
            continue
        why = d["why"]
        if d["lost"] and rules.reasons and rules.status != "ok":
            why += f" (why, from sglang's loading rules: {'; '.join(rules.reasons)})"
        parts.append(f"{names[k]}: FAIL, {why} — {d['line']}")
    native = m.get("native", {}).get("passed", False)
    flagged = m.get("transformers", {}).get("passed", False)
    status, flag = ("pass", None) if native else ("pass", FLAG) if flagged else ("fail", None)
    head = {("pass", None): "ran natively and passed",
            ("pass", FLAG): f"the native model fails, launch with `{FLAG}`",
            ("fail", None): f"failed with {'both implementations' if len(m) > 1 else 'the one run'}"}[(status, flag)]
    details = {"target": target_name, "sglang_version": res.get("sglang_version"), "dtype": "float32",
               "prompts": len(rows), "wall_seconds": res.get("wall_seconds"), "ran": list(m),
               "rules": rules.to_dict(), **{k: {kk: vv for kk, vv in d.items() if kk != "line"} for k, d in m.items()},
               "engine_seconds": {k: v.get("load_seconds") for k, v in res["engines"].items()}}
    if rules.status == "needs-flag" and native:
        details["rules_disagree"] = "the rules said the native model drops a bias, but it passed"
    return Verdict("sglang", status, f"sglang {res.get('sglang_version')} ran: {head}. " + "; ".join(parts),
                   launch_flag=flag, details=details)
