"""Reading an export's checkpoint for the engine checks: its tensor names, its non-zero biases,
what transformers builds for its config, and what to say about a tensor nothing declares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from bakery.models import read_config


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


def undeclared_message(export: Path, unexpected: Sequence[str]) -> str:
    """Why tensors the config does not declare are lost, naming the missing config flag."""
    cfg = read_config(export)
    flags = []
    if any(".mlp." in k for k in unexpected) and not cfg.get("mlp_bias"):
        flags.append("mlp_bias: true")
    if any(".self_attn." in k for k in unexpected) and not cfg.get("attention_bias"):
        flags.append("attention_bias: true")
    hint = f" (config.json lacks {' and '.join(flags)})" if flags else ""
    return (f"config.json does not declare {', '.join(list(unexpected)[:3])}"
            f"{' and more' if len(unexpected) > 3 else ''}{hint}, so the engines drop these tensors "
            "and the edit is lost")
