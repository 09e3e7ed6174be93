"""sglang: rules only, not run. sglang cannot run on these machines, so its verdict is a static
reading of the export against sglang's loading rules, labelled "rules only (not run)" wherever it
is shown, and never counted as a pass (:class:`bakery.engines.common.Verdict`, kind ``rules``).

The rules come from shared/ENGINES.md (sglang 0.5.23, read from its code, and the Llama row run
on the CPU since): sglang builds a bias only where its native model class does, and silently
discards any ``*.bias`` tensor that has no matching parameter. Its Transformers backend
(``--model-impl transformers``) builds exactly what transformers builds for the same config. So
each non-zero bias tensor in the export is either built natively, built only by the Transformers
backend (launch flag needed), or built by neither (the edit is lost whatever the flag: a real
failure, which the rules can find without running anything). A clean rule check says only that
nothing in the rules forbids the export.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bakery.engines.common import RULES_ONLY, Verdict, nonzero_biases, transformers_param_names

FLAG = "--model-impl transformers"
SGLANG_VERSION = "0.5.23"


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
    # Granite: neither the MLP nor o_proj carries a bias in sglang.
    "GraniteForCausalLM": lambda cfg: [_QKV] if cfg.get("attention_bias") else [],
    # Always-biased or natively biased families: every bias is built.
    "GPT2LMHeadModel": lambda cfg: [r"\.bias$"],
    "GPTNeoXForCausalLM": lambda cfg: [r"\.bias$"],
    "GptOssForCausalLM": lambda cfg: [r"\.bias$"],
    "ApertusForCausalLM": lambda cfg: [r"\.bias$"],
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
    if rules is None:
        return RuleCheck(
            "unknown", reasons=[f"bakery has no sglang rules for {arch}; {FLAG} builds what "
                                "transformers builds, so it is the safe launch flag"], flag=FLAG)
    patterns = [re.compile(p) for p in rules(config)]
    dropped = [b for b in biases if not any(p.search(b) for p in patterns)]
    if not dropped:
        return RuleCheck("ok", reasons=[f"sglang's native {arch} builds every non-zero bias"])
    return RuleCheck(
        "needs-flag", flag=FLAG, native_dropped=dropped,
        reasons=[f"sglang's native {arch} has no parameter for {len(dropped)} non-zero bias tensor(s) "
                 f"(e.g. {dropped[0]}) and would drop them silently; its Transformers backend keeps them"])


def verify_sglang(export: str | Path) -> Verdict:
    """The sglang verdict: rules only (not run). A rule violation fails; anything else is not run."""
    v = check(export)
    msg = f"{RULES_ONLY}: sglang {SGLANG_VERSION} loading rules: {v.summary()}"
    status = "fail" if v.status == "fail" else "not-run"
    return Verdict("sglang", status, msg, launch_flag=v.flag, details={"rules": v.to_dict()}, kind="rules")
