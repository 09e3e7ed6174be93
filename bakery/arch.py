"""Per-architecture facts: where the blocks live, what writes the residual stream, which bias
routes exist and which engines keep them.

Every other module asks this table instead of guessing from module names. The engine verdicts
follow shared/ENGINES.md (transformers 5.23, vLLM 0.33, sglang 0.5.23).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

ENGINES = ("transformers", "vllm", "sglang")


class UnsupportedArchitecture(ValueError):
    """The model type is not in the table: bakery will not guess where its residual stream is."""


@dataclass(frozen=True)
class BiasRoute:
    """A constant added to the residual stream through the bias of one linear per block.

    ``tensor`` is relative to the block prefix (``{blocks}.{i}.``). ``flags`` are the config keys
    that make stock code build the bias; ``siblings`` are the other biases (relative to each block)
    that the same flags create in every block and that must be written as explicit zeros.
    ``engines`` maps engine name to a verdict: "ok", "drop" (silently discarded) or a launch flag
    that makes it work (for example ``--model-impl transformers``).
    """

    tensor: str
    flags: Mapping[str, Any] = field(default_factory=dict)
    siblings: tuple[str, ...] = ()
    engines: Mapping[str, str] = field(default_factory=dict)
    scale_key: str | None = None  # config key the bias is divided by (Granite residual_multiplier)
    rehost_as: str | None = None  # write the export as this model_type (Qwen2/Mistral -> llama)
    note: str = ""


@dataclass(frozen=True)
class ArchSpec:
    """Facts about one ``model_type``. Tensor and module names are relative to the block prefix
    unless they start with the model's own prefix."""

    model_type: str
    blocks: str  # module path of the block list, also the tensor-name prefix
    embeddings: tuple[str, ...]  # modules whose output is (a summand of) hidden_states[0]
    attn_out: str  # module inside a block whose output is the attention write
    mlp_out: str  # module inside a block whose output is the MLP write
    final_norm: str
    lm_head: str  # module path of the output head
    norm_style: str = "pre"  # "pre" or "sandwich" (a norm after each sublayer, before the add)
    # For sandwich blocks the residual write is the post-norm's output, not the linear's.
    attn_write: str | None = None
    mlp_write: str | None = None
    mid_norm: str | None = None  # module whose *input* is the residual between attention and MLP
    conv1d: bool = False  # GPT-2 Conv1D stores weights as [in, out]
    parallel_residual_key: str | None = None  # config key: attention and MLP read the same input
    routes: Mapping[str, BiasRoute] = field(default_factory=dict)  # "resid-out", "attn-out"
    alternatives: str = "--route rank1 (approximate, any engine) or --method kl-lora"
    lm_head_tensor: str | None = None  # checkpoint name of the head when it differs from the module

    def head_weight(self) -> str:
        """Checkpoint tensor name of the output head's weight."""
        return f"{self.lm_head_tensor or self.lm_head}.weight"

    @property
    def sandwich(self) -> bool:
        return self.norm_style == "sandwich"

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}"

    def attn_writer(self) -> str:
        return self.attn_write or self.attn_out

    def mlp_writer(self) -> str:
        return self.mlp_write or self.mlp_out

    def residual_weights(self, num_layers: int) -> list[str]:
        """Weight tensors (``.weight``) whose rows write the residual stream, for ortho baking."""
        names = [f"{e}.weight" for e in self.embeddings]
        for i in range(num_layers):
            names.append(f"{self.block(i)}.{self.attn_out}.weight")
            names.append(f"{self.block(i)}.{self.mlp_out}.weight")
        return names


_LLAMA_ENGINES_MLP = {"transformers": "ok", "vllm": "ok", "sglang": "--model-impl transformers"}
_ALL_OK = {"transformers": "ok", "vllm": "ok", "sglang": "ok"}
_LLAMA_SIBLINGS_MLP = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")
_LLAMA_SIBLINGS_ATTN = (
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.bias",
)


def _llama_like(model_type: str, routes: Mapping[str, BiasRoute] | None = None) -> ArchSpec:
    if routes is None:
        routes = {
            "resid-out": BiasRoute(
                "mlp.down_proj.bias",
                {"mlp_bias": True},
                _LLAMA_SIBLINGS_MLP,
                _LLAMA_ENGINES_MLP,
                note="sglang's native Llama MLP is built without bias",
            ),
            "attn-out": BiasRoute(
                "self_attn.o_proj.bias", {"attention_bias": True}, _LLAMA_SIBLINGS_ATTN, _ALL_OK
            ),
        }
    return ArchSpec(
        model_type=model_type,
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        final_norm="model.norm",
        lm_head="lm_head",
        mid_norm="post_attention_layernorm",
        routes=routes,
    )


def _rehost(flags: Mapping[str, Any], note: str) -> dict[str, BiasRoute]:
    """Routes for architectures re-hosted as ``LlamaForCausalLM`` to gain an MLP bias."""
    base = _llama_like("llama").routes
    return {
        site: BiasRoute(r.tensor, {**r.flags, **flags}, r.siblings, r.engines, rehost_as="llama", note=note)
        for site, r in base.items()
    }


def _sandwich(model_type: str, pre_mlp_norm: bool) -> ArchSpec:
    return replace(
        _llama_like(model_type, {}),
        norm_style="sandwich",
        attn_write="post_attention_layernorm",
        mlp_write="post_feedforward_layernorm",
        mid_norm="pre_feedforward_layernorm" if pre_mlp_norm else None,
        routes={},
        alternatives="--route rank1 (approximate) or --method kl-lora; a post-sublayer norm "
        "rescales any bias, so no exact bias route exists",
    )


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like(
        "mistral",
        _rehost({"sliding_window": None}, "re-hosted as LlamaForCausalLM; exact only without sliding window"),
    ),
    "qwen2": _llama_like(
        "qwen2",
        _rehost(
            {"attention_bias": True, "mlp_bias": True, "sliding_window": None},
            "re-hosted as LlamaForCausalLM with its q/k/v biases kept",
        ),
    ),
    "qwen3": _llama_like(
        "qwen3",
        {
            "attn-out": BiasRoute(
                "self_attn.o_proj.bias",
                {"attention_bias": True},
                _LLAMA_SIBLINGS_ATTN,
                {"transformers": "ok", "vllm": "drop", "sglang": "ok"},
                note="q/k-norm rules out re-hosting; no MLP bias exists",
            )
        },
    ),
    "phi3": replace(
        _llama_like("phi3", {}),
        alternatives="--route rank1 (approximate, any engine) or --method kl-lora; Phi-3 has no "
        "bias flag and bakery does not re-host its fused projections",
    ),
    "gemma2": _sandwich("gemma2", True),
    "gemma3_text": _sandwich("gemma3_text", True),
    "olmo2": _sandwich("olmo2", False),
    "gpt2": ArchSpec(
        model_type="gpt2",
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        mid_norm="ln_2",
        conv1d=True,
        routes={
            "resid-out": BiasRoute("mlp.c_proj.bias", {}, (), _ALL_OK),
            "attn-out": BiasRoute("attn.c_proj.bias", {}, (), _ALL_OK),
        },
    ),
    "gpt_neox": ArchSpec(
        model_type="gpt_neox",
        blocks="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # transformers 5 module name; checkpoints keep "embed_out"
        lm_head_tensor="embed_out",
        mid_norm="post_attention_layernorm",
        parallel_residual_key="use_parallel_residual",
        routes={
            "resid-out": BiasRoute("mlp.dense_4h_to_h.bias", {}, (), _ALL_OK),
            "attn-out": BiasRoute(
                "attention.dense.bias", {}, (), _ALL_OK, note="sequential residual only"
            ),
        },
    ),
}


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """Read a key from a config object or a config.json dict alike."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def spec_for(config: Any) -> ArchSpec:
    """The table entry for a config (object or dict), or a clear error naming what is supported."""
    mt = cfg_get(config, "model_type")
    if cfg_get(config, "text_config") is not None:
        raise UnsupportedArchitecture(
            f"model_type '{mt}' is a multimodal wrapper (its language model sits under text_config "
            "and model.language_model): bakery edits text-only checkpoints. Use the text-only "
            "variant of the model (for Gemma 3: a gemma3_text checkpoint) or extract its language model.")
    try:
        return ARCHITECTURES[mt]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"bakery has no architecture facts for model_type '{mt}'. Supported: {known}. "
            "Add an entry to bakery/arch.py (block path, residual writers, norm style, bias routes) "
            "rather than letting bakery guess."
        ) from None


def num_layers_of(config: Any) -> int:
    return int(cfg_get(config, "num_hidden_layers") or cfg_get(config, "n_layer"))


def hidden_size_of(config: Any) -> int:
    return int(cfg_get(config, "hidden_size") or cfg_get(config, "n_embd"))


def is_parallel_residual(spec: ArchSpec, config: Any) -> bool:
    if spec.parallel_residual_key is None:
        return False
    return bool(cfg_get(config, spec.parallel_residual_key, True))


def tied_embeddings(config: Any) -> bool:
    return bool(cfg_get(config, "tie_word_embeddings", True))
