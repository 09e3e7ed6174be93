"""What llama.cpp's graphs do with an edit, per GGUF ``general.architecture`` (read from the
llama.cpp sources vendored in llama-cpp-python 0.3.36, ``src/models/*.cpp``).

Only architectures whose graph was read are listed; any other is refused with the conversion
path as the alternative, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONVERT_HINT = ("convert the export folder through llama.cpp's own converter instead: "
                "`bakery gguf EXPORT -o OUT` without --from-gguf")


@dataclass(frozen=True)
class GGUFArch:
    """llama.cpp facts for one GGUF architecture."""

    # bake site -> GGUF tensor stem whose optional bias the graph loads and adds (blk.N.<stem>.bias)
    bias: dict[str, str] = field(default_factory=dict)
    no_bias_reason: str = ""
    # the tensors that write the residual stream, by stem (ortho); empty: ortho is refused
    writers: tuple[str, ...] = ()
    no_ortho_reason: str = ""
    dense_only_bias: bool = False  # the MLP bias exists only without experts


_PRE_NORM_WRITERS = ("attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp")
_SANDWICH = ("its blocks renormalise each sublayer's output (attn_post_norm / ffn_post_norm), so "
             "neither a bias nor a projection before that norm equals steering of the residual stream")

ARCHS: dict[str, GGUFArch] = {
    # src/models/llama.cpp: wo_b, ffn_down_b (and ffn_gate_b/ffn_up_b) are TENSOR_NOT_REQUIRED and
    # added by the graph; the MoE branch has no down bias. Mistral-style GGUFs use this graph too.
    "llama": GGUFArch(bias={"resid-out": "ffn_down", "attn-out": "attn_output"},
                      writers=_PRE_NORM_WRITERS, dense_only_bias=True),
    "qwen2": GGUFArch(no_bias_reason="llama.cpp's qwen2 graph loads no attn_output or ffn_down bias",
                      writers=_PRE_NORM_WRITERS),
    "qwen3": GGUFArch(no_bias_reason="llama.cpp's qwen3 graph loads no attn_output or ffn_down bias",
                      writers=_PRE_NORM_WRITERS),
    "qwen3moe": GGUFArch(no_bias_reason="llama.cpp's qwen3moe graph loads no attn_output or expert "
                         "down bias", writers=_PRE_NORM_WRITERS),
    "qwen35": GGUFArch(no_bias_reason="llama.cpp's qwen35 graph loads no attn_output or ffn_down bias",
                       no_ortho_reason="its Gated DeltaNet blocks write through tensors bakery has no "
                       "llama.cpp facts for"),
    "gemma2": GGUFArch(no_bias_reason=_SANDWICH, no_ortho_reason=_SANDWICH),
    "gemma3": GGUFArch(no_bias_reason=_SANDWICH, no_ortho_reason=_SANDWICH),
    "olmo2": GGUFArch(no_bias_reason=_SANDWICH, no_ortho_reason=_SANDWICH),
}

# transformers model_type of an export -> the GGUF architecture llama.cpp's converter writes
HF_TO_GGUF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
              "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3",
              "olmo2": "olmo2", "qwen3_5": "qwen35", "qwen3_5_text": "qwen35"}


def arch_facts(arch: str) -> GGUFArch | None:
    return ARCHS.get(arch)
