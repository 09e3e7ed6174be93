"""The shape of an architecture's facts: :class:`ArchSpec` (blocks, residual writers, norm style,
experts, bias routes) and :class:`BiasRoute` (a constant through one bias, and which engines keep
it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from bakery.arch.config import cfg_get, text_config_of
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


