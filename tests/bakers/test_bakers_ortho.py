"""The ``ortho`` baker: exact against runtime ablation (bakery.steering.hooks.Ablation)."""

from __future__ import annotations

import json

import pytest
import torch

from bakery.bakers import bake
from bakery.bakers.errors import BakeError
from bakery.models import load_model
from bakery.steering.hooks import Ablation, Steering, SteeringTerm
from helpers import assert_refused, logits, reload_strict, tree_digest, vec

PRE_NORM = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox"]
SANDWICH = ["gemma2", "gemma3_text", "olmo2"]


@pytest.mark.parametrize("arch", PRE_NORM)
def test_ortho_matches_runtime_ablation(arch, tiny_models, tmp_path):
    src = tiny_models(arch)
    before = tree_digest(src)
    v = vec(src, seed=5)
    out = bake("ortho", src, [(v, 2, None)], tmp_path / "out", progress=False)
    assert tree_digest(src) == before
    ref = load_model(src)
    with Ablation(ref, v.vectors[2]):
        want = logits(ref)
    assert (logits(reload_strict(out)) - want).abs().max() < 1e-4
    assert (logits(ref) - want).abs().max() > 1e-3
    m = json.loads((out / "bakery.json").read_text())
    assert m["route"] == "ortho" and m["exact"] is True and m["ablation"]["embeddings"] == "ablate"
    assert any("both of its poles" in w for w in m["extra"]["warnings"])


def test_block_range_and_keep_embeddings(tiny_models, tmp_path):
    src = tiny_models("llama")
    v = vec(src, seed=6)
    out = bake("ortho", src, [(v, 3, None)], tmp_path / "out", blocks="1-2", embeddings="keep",
               progress=False)
    ref = load_model(src)
    with Ablation(ref, v.vectors[3], blocks=[1, 2], embeddings=False):
        want = logits(ref)
    assert (logits(reload_strict(out)) - want).abs().max() < 1e-4
    with Ablation(ref, v.vectors[3], embeddings=True):
        other = logits(ref)
    assert (other - want).abs().max() > 1e-3  # the range matters: it is a different reference


def test_per_layer_directions(tiny_models, tmp_path):
    src = tiny_models("qwen2")
    v = vec(src, seed=7)
    out = bake("ortho", src, [(v, 2, None)], tmp_path / "out", per_layer=True, progress=False)
    ref = load_model(src)
    with Ablation(ref, {i: v.vectors[i + 1] for i in range(4)}):
        want = logits(ref)
    assert (logits(reload_strict(out)) - want).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_ortho_add_is_ablation_plus_constant(arch, tiny_models, tmp_path):
    src = tiny_models(arch)
    v = vec(src, seed=8)
    out = bake("ortho", src, [(v, 2, None)], tmp_path / "out", add=2.5, progress=False)
    ref = load_model(src)
    r = v.vectors[2] / v.vectors[2].norm()
    with Ablation(ref, v.vectors[2]), Steering(ref, [SteeringTerm(2, r, 2.5)]):
        want = logits(ref)
    assert (logits(reload_strict(out)) - want).abs().max() < 1e-4
    m = json.loads((out / "bakery.json").read_text())
    assert m["route"] == "ortho+bias" and m["ablation"]["add"] == 2.5


def test_tied_embeddings_untie_or_keep(tiny_models, tmp_path):
    src = tiny_models("llama", tie_word_embeddings=True)
    v = vec(src, seed=9)
    ref = load_model(src)
    untied = bake("ortho", src, [(v, 2, None)], tmp_path / "u", progress=False)
    cfg = json.loads((untied / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    baked = reload_strict(untied)
    assert torch.equal(baked.lm_head.weight, ref.lm_head.weight)  # output head kept
    assert not torch.equal(baked.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    with Ablation(ref, v.vectors[2]):
        want = logits(ref)
    assert (logits(baked) - want).abs().max() < 1e-4
    kept = bake("ortho", src, [(v, 2, None)], tmp_path / "k", embeddings="keep", progress=False)
    assert json.loads((kept / "config.json").read_text())["tie_word_embeddings"] is True
    with Ablation(ref, v.vectors[2], embeddings=False):
        want = logits(ref)
    assert (logits(reload_strict(kept)) - want).abs().max() < 1e-4
    assert "untied" in (untied / "README.md").read_text()


@pytest.mark.parametrize("arch", SANDWICH)
def test_sandwich_norm_is_refused(arch, tiny_models, tmp_path):
    src = tiny_models(arch)
    assert_refused("kl-lora", "ortho", src, [(vec(src), 2, None)], tmp_path / "out")


def test_bad_options(tiny_models, tmp_path):
    src = tiny_models("llama")
    v = vec(src)
    with pytest.raises(BakeError, match="out of range"):
        bake("ortho", src, [(v, 2, None)], tmp_path / "o", blocks="2-9", progress=False)
    with pytest.raises(BakeError, match="one term"):
        bake("ortho", src, [(v, 2, None), (v, 3, None)], tmp_path / "o", progress=False)
    zero = vec(src)
    zero.vectors[2] = 0
    with pytest.raises(BakeError, match="zeros"):
        bake("ortho", src, [(zero, 2, None)], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ortho_on_the_embedded_model(smol_dir, smol_pirate, tmp_path):
    from bakery.models import load_tokenizer
    from helpers import fidelity_on_smol

    v = smol_pirate
    out = bake("ortho", smol_dir, [(v, 22, None)], tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    base, baked, tok = load_model(smol_dir), reload_strict(out), load_tokenizer(smol_dir)
    f = fidelity_on_smol(base, baked, tok, lambda P: Ablation(base, v.vectors[22]))
    print(f"ortho bake on SmolLM2 (bf16), layer 22, embeddings untied: {f.to_dict()}")
    assert f.recovered >= 0.999 and f.kl < 1e-3


def test_large_tensors_are_streamed_in_row_blocks(tiny_models, tmp_path, monkeypatch):
    """Row-wise edits (embeddings, GPT-2 Conv1D writers) are applied block by block; same result."""
    import bakery.bakers.plan as export

    monkeypatch.setattr(export, "ROW_BLOCK_BYTES", 4096)  # a few rows per block on a tiny model
    for arch in ("llama", "gpt2"):
        src = tiny_models(arch)
        v = vec(src, seed=5)
        out = bake("ortho", src, [(v, 2, None)], tmp_path / arch, progress=False)
        ref = load_model(src)
        with Ablation(ref, v.vectors[2]):
            want = logits(ref)
        assert (logits(reload_strict(out)) - want).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_projections_keep_the_dtype_and_match_dense_math(dtype):
    """The blocked, in-place projections (several cache-sized blocks here) equal the dense float32
    formula rounded once to the stored dtype, and leave no component along ``r``."""
    from bakery.bakers.ortho import _BLOCK_FLOATS, project_cols, project_rows

    g = torch.Generator().manual_seed(0)
    r = torch.randn(600, generator=g)
    r /= r.norm()
    cols = torch.randn(600, 3 * _BLOCK_FLOATS // 600 + 7, generator=g).to(dtype)
    rows = torch.randn(3 * _BLOCK_FLOATS // 600 + 7, 600, generator=g).to(dtype)
    want_cols = (cols.float() - torch.outer(r, r @ cols.float())).to(dtype)
    want_rows = (rows.float() - torch.outer(rows.float() @ r, r)).to(dtype)
    got_cols, got_rows = project_cols(cols.clone(), r), project_rows(rows.clone(), r)
    assert got_cols.dtype == got_rows.dtype == dtype
    ulp = {torch.float32: 1e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    for got, want in ((got_cols, want_cols), (got_rows, want_rows)):
        assert ((got.float() - want.float()).abs() <= ulp * want.float().abs().clamp(min=1)).all()
    assert (r @ got_cols.float()).abs().max() < 50 * ulp
    assert (got_rows.float() @ r).abs().max() < 50 * ulp
    assert (r @ cols.float()).abs().max() > 1  # there was a component to remove
