"""The ``bias`` baker: exact against runtime steering where a route exists, clear refusals elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

from bakery.arch import ARCHITECTURES
from bakery.bakers import bake
from bakery.bakers.errors import BakeError
from bakery.models import load_model
from bakery.steering.hooks import Steering, SteeringTerm, blocks_of, steer
from bakery.vectors.artifact import VectorArtifact, VectorError
from helpers import assert_refused, fidelity_on_smol, logits, reload_strict, tree_digest, vec

EXACT_RESID = [t for t in ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")]
NO_RESID = ["qwen3", "phi3", "gemma2", "gemma3_text", "olmo2"]


@pytest.mark.parametrize("arch", EXACT_RESID)
def test_bias_bake_matches_runtime_steering(arch, tiny_models, tmp_path):
    src = tiny_models(arch)
    before = tree_digest(src)
    v = vec(src)
    out = bake("bias", src, [(v, 2, 4.0)], tmp_path / "out", progress=False)
    assert tree_digest(src) == before  # the source folder is byte-identical
    baked = reload_strict(out)
    ref = load_model(src)
    with steer(ref, v, 2, 4.0, positions="all"):
        want = logits(ref)
    got = logits(baked)
    assert (got - want).abs().max() < 1e-4
    assert (logits(ref) - want).abs().max() > 1e-2  # the steering does something
    m = json.loads((out / "bakery.json").read_text())
    assert m["exact"] is True and m["route"] == "mlp-bias" and m["terms"][0]["block"] == 1
    if arch in ("qwen2", "mistral"):
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["mlp_bias"] is True
        assert cfg.get("sliding_window") is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_attn_out_site_matches_a_hook_after_attention(arch, tiny_models, tmp_path):
    src = tiny_models(arch)
    v = vec(src, seed=3)
    out = bake("bias", src, [(v, 2, 3.0)], tmp_path / "out", site="attn-out", progress=False)
    baked = reload_strict(out)
    ref = load_model(src)
    spec = ARCHITECTURES[ref.config.model_type]
    attn = blocks_of(ref)[2].get_submodule(spec.attn_out)  # block L=2, after its attention
    h = attn.register_forward_hook(lambda m, a, o: o + 3.0 * v.vectors[2])
    try:
        want = logits(ref)
    finally:
        h.remove()
    assert (logits(baked) - want).abs().max() < 1e-4
    assert json.loads((out / "bakery.json").read_text())["engines"] == {
        "transformers": "ok", "vllm": "ok", "sglang": "ok"}


def test_several_terms_sum_like_several_hooks(tiny_models, tmp_path):
    src = tiny_models("llama")
    a, b = vec(src, 1, "a"), vec(src, 2, "b")
    out = bake("bias", src, [(a, 1, 2.0), (b, 3, -1.5), (a, 3, 0.5)], tmp_path / "out", progress=False)
    ref = load_model(src)
    terms = [SteeringTerm(1, a.vectors[1], 2.0), SteeringTerm(3, b.vectors[3], -1.5),
             SteeringTerm(3, a.vectors[3], 0.5)]
    with Steering(ref, terms):
        want = logits(ref)
    assert (logits(reload_strict(out)) - want).abs().max() < 1e-4
    m = json.loads((out / "bakery.json").read_text())
    assert [t["vector_file"] for t in m["terms"]] == ["vectors/a.safetensors", "vectors/b.safetensors",
                                                      "vectors/a.safetensors"]


@pytest.mark.parametrize("arch", NO_RESID)
def test_no_exact_route_is_refused_with_alternatives(arch, tiny_models, tmp_path):
    src = tiny_models(arch)
    with pytest.raises(BakeError, match="rank1"):
        bake("bias", src, [(vec(src), 2, 1.0)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_engine_that_would_drop_the_bias_is_refused(tiny_models, tmp_path):
    src = tiny_models("qwen3")
    v = vec(src)
    with pytest.raises(BakeError, match="vllm would silently drop.*--target-engine transformers,sglang"):
        bake("bias", src, [(v, 2, 1.0)], tmp_path / "q", site="attn-out", progress=False)
    assert not (tmp_path / "q").exists()
    out = bake("bias", src, [(v, 2, 1.0)], tmp_path / "q", site="attn-out",
               target_engines="transformers,sglang", progress=False)
    reload_strict(out)
    assert json.loads((out / "bakery.json").read_text())["engines"]["vllm"] == "drop"
    assert "silently drops" in (out / "README.md").read_text()


def test_sglang_native_demand_refuses_llama_mlp_bias(tiny_models, tmp_path):
    src = tiny_models("llama")
    with pytest.raises(BakeError, match="--model-impl transformers.*--site attn-out"):
        bake("bias", src, [(vec(src), 2, 1.0)], tmp_path / "o", target_engines="vllm,sglang-native",
             progress=False)
    out = bake("bias", src, [(vec(src), 2, 1.0)], tmp_path / "o", progress=False)  # default: allowed, noted
    m = json.loads((out / "bakery.json").read_text())
    assert m["engines"]["sglang"] == "--model-impl transformers"
    assert "--model-impl transformers" in (out / "README.md").read_text()


def test_sliding_window_model_is_not_rehosted(tiny_models, tmp_path):
    src = tiny_models("mistral", sliding_window=4)
    with pytest.raises(BakeError, match="sliding-window"):
        bake("bias", src, [(vec(src), 2, 1.0)], tmp_path / "o", progress=False)


def test_quantized_checkpoints_are_refused(tiny_models, tmp_path):
    """A quantization_config, or weights stored as float8, would make an edit of the stored values
    wrong: refused before anything is written, for the closed-form and the distilled bakers."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_models("llama")
    q = tmp_path / "gptq"
    shutil.copytree(src, q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (q / "config.json").write_text(json.dumps(cfg))
    for method in ("bias", "ortho", "kl-lora"):
        with pytest.raises(BakeError, match=r"quantized \(gptq\).*unquantized"):
            coef = None if method == "ortho" else 1.0
            bake(method, q, [(vec(src), 2, coef)], tmp_path / f"out-{method}", progress=False)
        assert not (tmp_path / f"out-{method}").exists()

    f8 = tmp_path / "fp8"
    shutil.copytree(src, f8)
    tensors = load_file(f8 / "model.safetensors")
    tensors = {n: t.to(torch.float8_e4m3fn) if n.endswith("down_proj.weight") else t for n, t in tensors.items()}
    save_file(tensors, f8 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BakeError, match="down_proj.weight is stored as F8_E4M3"):
        bake("bias", f8, [(vec(src), 2, 1.0)], tmp_path / "out-f8", progress=False)
    assert_refused("stored as F8_E4M3", "ortho", f8, [(vec(src), 2, None)], tmp_path / "out-f8")


def test_bad_layers_and_foreign_vectors(tiny_models, tmp_path):
    src = tiny_models("llama")
    v = vec(src)
    for layer in (0, 4, 5, -1):  # 4 is the post-final-norm row
        with pytest.raises(BakeError, match="layer"):
            bake("bias", src, [(v, layer, 1.0)], tmp_path / "o", progress=False)
    other = VectorArtifact(torch.randn(5, 48), {"trait": "x", "model": "someone/else"})
    with pytest.raises(BakeError, match="another model"):
        bake("bias", src, [(other, 2, 1.0)], tmp_path / "o", progress=False)
    with pytest.raises(BakeError, match="another model"):
        bake("bias", src, [(VectorArtifact(torch.randn(9, 32)), 2, 1.0)], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(VectorError, match="not found"):
        bake("bias", src, [(tmp_path / "nope.safetensors", 2, 1.0)], tmp_path / "o", progress=False)


def test_gpt_neox_parallel_residual_has_no_attn_out_site(tiny_models, tmp_path):
    src = tiny_models("gpt_neox")
    with pytest.raises(BakeError, match="parallel residual"):
        bake("bias", src, [(vec(src), 2, 1.0)], tmp_path / "o", site="attn-out", progress=False)


# ---- the embedded real model (bf16 storage) ---------------------------------------------------


@pytest.mark.slow
def test_bias_bake_on_the_embedded_model(smol_dir, smol_pirate, tmp_path):
    from bakery.models import load_tokenizer

    before = tree_digest(smol_dir)
    v = smol_pirate
    out = bake("bias", smol_dir, [(v, 16, 2.0)], tmp_path / "out", progress=False)
    assert tree_digest(smol_dir) == before
    base, baked, tok = load_model(smol_dir), reload_strict(out), load_tokenizer(smol_dir)
    f = fidelity_on_smol(base, baked, tok, lambda P: steer(base, v, 16, 2.0))
    print(f"bias bake on SmolLM2 (bf16), layer 16 coef 2: {f.to_dict()}")
    assert f.recovered >= 0.999 and f.kl_base > 0.05
