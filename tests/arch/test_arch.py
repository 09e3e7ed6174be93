"""The architecture table against the real transformers modules of every tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from bakery.arch import (ARCHITECTURES, ENGINES, UnsupportedArchitecture, cfg_get,
                         hidden_size_of, is_parallel_residual, num_layers_of,
                         spec_for, tied_embeddings)
from bakery.io.names import TensorNames
from bakery.models import load_model
from tiny import MOE_TYPES


def test_every_tiny_architecture_has_an_entry(arch_type):
    assert spec_for({"model_type": arch_type}).model_type == arch_type


def test_module_and_tensor_names_exist(arch_type, tiny_models):
    """Every path the table names is a real module and a real tensor in the checkpoint."""
    folder = tiny_models(arch_type)
    model = load_model(folder)
    spec = spec_for(model.config)
    names = dict(model.named_modules())
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        params = set(f.keys())  # checkpoint names (what the bakers edit)
    blocks = model.get_submodule(spec.blocks)
    assert len(blocks) == num_layers_of(model.config) == 4
    for e in spec.embeddings:
        assert isinstance(names[e], torch.nn.Embedding)
    assert spec.final_norm in names and spec.lm_head in names
    assert spec.head_weight() in params
    for i in range(4):
        mods = (spec.attn_out_for(model.config, i), spec.mlp_out, spec.attn_writer(model.config, i),
                spec.mlp_writer())
        for mod in mods:
            assert f"{spec.block(i)}.{mod}" in names, (arch_type, mod)
        if spec.mid_norm:
            assert f"{spec.block(i)}.{spec.mid_norm}" in names
    for w in spec.residual_weights(4, model.config):
        assert w in params, w
    tn = TensorNames(params, spec, model.config)
    for i in range(4):  # every residual writer of every block resolves to a checkpoint tensor
        kinds = {w.kind for w in tn.block_writers(i)}
        assert "attn" in kinds and ({"expert"} <= kinds if spec.experts else "mlp" in kinds), kinds
    for site, route in spec.routes.items():
        typed = [i for i in range(4) if route.layer_type in (None, spec.layer_type(model.config, i))]
        weight = f"{spec.block(typed[0])}.{route.tensor[:-len('.bias')]}.weight"
        assert weight in params or route.per_expert, (site, weight)
        assert set(route.engines) <= set(ENGINES)


def test_base_prefix_is_transformers_base_model_prefix(arch_type):
    """The prefix bakery strips or adds is the one transformers adds on load."""
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    cls = AutoModelForCausalLM._model_mapping[type(tiny_config(arch_type, 320))]
    assert spec_for({"model_type": arch_type}).base_prefix == cls.base_model_prefix


@pytest.mark.parametrize("block_index", [1, 3])
def test_residual_writers_sum_to_the_block_output(arch_type, tiny_models, block_index):
    """Block output = input + token-mixer write + MLP write (what bakers edit), in each layer
    type; Granite scales both writes by residual_multiplier."""
    model = load_model(tiny_models(arch_type))
    spec = spec_for(model.config)
    block = model.get_submodule(spec.blocks)[block_index]
    seen = {}
    hooks = [block.get_submodule(spec.attn_writer(model.config, block_index)).register_forward_hook(
                 lambda m, a, o: seen.__setitem__("attn", o[0] if isinstance(o, tuple) else o)),
             block.get_submodule(spec.mlp_writer()).register_forward_hook(
                 lambda m, a, o: seen.__setitem__("mlp", o[0] if isinstance(o, tuple) else o)),
             block.register_forward_pre_hook(
                 lambda m, a, k: seen.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True),
             block.register_forward_hook(
                 lambda m, a, o: seen.__setitem__("y", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad():
        model(torch.tensor([[3, 9, 27, 81, 100]]))
    for h in hooks:
        h.remove()
    scale = getattr(model.config, "residual_multiplier", 1.0)
    assert torch.allclose(seen["x"] + scale * (seen["attn"] + seen["mlp"]), seen["y"], atol=1e-5)


def test_norm_styles_match_the_modules(arch_type, tiny_models):
    spec = spec_for({"model_type": arch_type})
    names = dict(load_model(tiny_models(arch_type)).named_modules())
    has_post_ffn = any(n.endswith("post_feedforward_layernorm") for n in names)
    assert spec.sandwich == has_post_ffn
    if spec.sandwich:
        assert not spec.routes  # no exact bias route on sandwich blocks


def test_config_helpers_read_dicts_and_objects(tiny_models):
    d = json.loads((tiny_models("gpt2") / "config.json").read_text())
    assert num_layers_of(d) == 4 and hidden_size_of(d) == 32
    assert cfg_get(d, "n_embd") == 32 and cfg_get(d, "missing", 7) == 7
    m = load_model(tiny_models("gpt_neox"))
    assert is_parallel_residual(spec_for(m.config), m.config)
    assert not is_parallel_residual(ARCHITECTURES["llama"], {"model_type": "llama"})
    assert tied_embeddings({"tie_word_embeddings": False}) is False
    assert tied_embeddings({}) is True  # transformers' default


def test_moe_experts_are_fused_in_the_module_and_per_expert_in_the_checkpoint(tiny_models):
    """transformers 5.24 holds the experts of a block as one 3-D parameter, and save_pretrained
    splits it into one weight per expert (gpt-oss keeps the fused tensors): both are what bakery's
    table says."""
    for mt in MOE_TYPES:
        folder = tiny_models(mt)
        model = load_model(folder)
        spec = spec_for(model.config)
        ex = spec.experts
        fused = model.get_parameter(f"{spec.block(1)}.{ex.fused}")
        assert fused.ndim == 3 and fused.shape[ex.out_axis] == 32, (mt, fused.shape)
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        if ex.per_expert:
            per = TensorNames(keys, spec, model.config).resolve(f"{spec.block(1)}.{ex.per_expert.format(e=3)}")
            assert per in keys and f"{spec.block(1)}.{ex.fused}" not in keys
        else:
            assert f"{spec.block(1)}.{ex.fused}" in keys


def test_multimodal_wrappers_are_refused_clearly():
    """Gemma 3's multimodal checkpoint keeps its sizes under text_config: refused, not a TypeError."""
    with pytest.raises(UnsupportedArchitecture, match="multimodal wrapper.*gemma3_text"):
        spec_for({"model_type": "gemma3", "text_config": {"num_hidden_layers": 4}})


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnsupportedArchitecture, match="no architecture facts.*Supported: .*llama"):
        spec_for({"model_type": "mamba"})


def test_engine_verdicts_follow_engines_md():
    llama = ARCHITECTURES["llama"].routes
    assert llama["resid-out"].engines["sglang"] == "--model-impl transformers"
    assert llama["attn-out"].engines == {"transformers": "ok", "vllm": "ok", "sglang": "ok"}
    assert ARCHITECTURES["qwen3"].routes["attn-out"].engines["vllm"] == "drop"
    assert "resid-out" not in ARCHITECTURES["qwen3"].routes
    assert ARCHITECTURES["qwen2"].routes["resid-out"].rehost_as == "llama"
    assert ARCHITECTURES["qwen2"].routes["resid-out"].flags["sliding_window"] is None
