"""Static check of an export against sglang's loading rules (sglang cannot run on these machines).

The rules come from shared/ENGINES.md (sglang 0.5.23, read from its code): sglang builds a bias
only where its native model class does, and silently discards any ``*.bias`` tensor that has no
matching parameter. Its Transformers backend (``--model-impl transformers``) builds exactly what
transformers builds for the same config. So each non-zero bias tensor in the export is either
built natively (fine), built only by the Transformers backend (launch flag needed), or built by
neither (the edit is lost whatever the flag).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

FLAG = "--model-impl transformers"
SGLANG_VERSION = "0.5.23"


@dataclass
class SglangVerdict:
    status: str  # ok | needs-flag | fail | unknown
    flag: str | None = None
    reasons: list[str] = field(default_factory=list)
    native_dropped: list[str] = field(default_factory=list)  # non-zero biases the native model drops
    lost: list[str] = field(default_factory=list)  # non-zero biases no sglang model builds

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "needs-flag")

    def summary(self) -> str:
        if self.status == "ok":
            return "loads natively; every edited tensor is kept"
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


def checkpoint_tensor_names(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> file for a safetensors checkpoint (single file or sharded with an index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def transformers_param_names(folder: str | Path, trust_remote_code: bool = False) -> set[str]:
    """Parameter and buffer names transformers builds for the folder's config.json (on the meta
    device, so nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    return set(model.state_dict().keys())


def nonzero_biases(folder: str | Path, names: dict[str, Path] | None = None) -> list[str]:
    """Bias tensors of the checkpoint with any non-zero entry (a dropped all-zero bias is harmless)."""
    from safetensors import safe_open

    names = names or checkpoint_tensor_names(folder)
    by_file: dict[Path, list[str]] = {}
    for n, f in names.items():
        if n.endswith("bias"):
            by_file.setdefault(f, []).append(n)
    out = []
    for f, ns in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            out.extend(n for n in ns if bool(h.get_tensor(n).float().abs().max() > 0))
    return sorted(out)


def check(folder: str | Path, *, transformers_names: set[str] | None = None) -> SglangVerdict:
    """Verdict for serving ``folder`` with sglang: ok, needs-flag (with the flag), fail or unknown."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    biases = nonzero_biases(folder)
    if not biases:
        return SglangVerdict("ok", reasons=["no non-zero bias tensors: nothing a loader could drop"])
    if transformers_names is None:
        transformers_names = transformers_param_names(folder)
    rules = NATIVE.get(arch)
    lost = [b for b in biases if b not in transformers_names]
    if lost:
        return SglangVerdict(
            "fail", lost=lost,
            reasons=[f"{len(lost)} non-zero bias tensor(s) (e.g. {lost[0]}) have no parameter in "
                     f"{arch} with this config.json: sglang discards them silently, with or without "
                     f"{FLAG}. The config flag that creates them is off (for Llama: mlp_bias / "
                     "attention_bias); re-bake with bakery, which sets it."])
    if rules is None:
        return SglangVerdict(
            "unknown", reasons=[f"bakery has no sglang rules for {arch}; {FLAG} builds what "
                                "transformers builds, so it is the safe launch flag"], flag=FLAG)
    patterns = [re.compile(p) for p in rules(config)]
    dropped = [b for b in biases if not any(p.search(b) for p in patterns)]
    if not dropped:
        return SglangVerdict("ok", reasons=[f"sglang's native {arch} builds every non-zero bias"])
    return SglangVerdict(
        "needs-flag", flag=FLAG, native_dropped=dropped,
        reasons=[f"sglang's native {arch} has no parameter for {len(dropped)} non-zero bias tensor(s) "
                 f"(e.g. {dropped[0]}) and would drop them silently; its Transformers backend keeps them"])
