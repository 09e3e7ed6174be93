"""The output config of a bias route: its flags on, and the architecture re-hosted as Llama where
the route says so (Qwen2, Mistral, Phi-3 gain an MLP bias that way)."""

from __future__ import annotations

import copy
from typing import Any

from bakery.arch import BiasRoute, cfg_get, set_text_key
from bakery.bakers.errors import BakeError


def rehost_config(config: dict[str, Any], route: BiasRoute) -> dict[str, Any]:
    """The output config for a route: flags on, and re-hosted as Llama where the route says so."""
    cfg = copy.deepcopy(config)
    if route.rehost_as == "llama":
        src = cfg.get("model_type")
        layer_types = cfg.get("layer_types") or []
        sliding = cfg.get("use_sliding_window", src == "mistral") and cfg.get("sliding_window")
        if sliding or any(t != "full_attention" for t in layer_types):
            raise BakeError(
                f"this {src} model uses sliding-window attention (sliding_window="
                f"{cfg.get('sliding_window')}), so re-hosting it as LlamaForCausalLM to gain an MLP "
                "bias would change its attention: not exact. Use --route rank1 or --method kl-lora.")
        for key in ("use_sliding_window", "max_window_layers", "layer_types", "sliding_window"):
            cfg.pop(key, None)
        cfg["model_type"] = "llama"
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg.setdefault("attention_bias", False)
        cfg.setdefault("mlp_bias", False)
        cfg["bakery_rehosted_from"] = src
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and isinstance(rope, dict) and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]  # legacy key for older loaders (vLLM/sglang)
    for k, v in route.flags.items():  # where the language model reads them (a wrapper's text_config)
        set_text_key(cfg, k, v)
    return cfg


def arch_name(config: dict[str, Any]) -> str:
    archs = cfg_get(config, "architectures") or []
    return archs[0] if archs else str(cfg_get(config, "model_type"))
