"""Checkpoint tensor names resolved as transformers resolves them (bakery.io.names): every baker on
checkpoints without the base-model prefix (GPT-2 as published: ``h.N.*``, ``wte.weight``), on
other stored layouts, and a clear error for names that cannot be resolved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bakery.arch import spec_for
from bakery.bakers import bake
from bakery.bakers.errors import BakeError
from bakery.io.names import TensorNameError, TensorNames
from bakery.models import load_model
from bakery.steering.hooks import steer
from helpers import IDS, logits, reload_strict, tree_digest, vec
from tiny import ARCH_TYPES


def renamed_copy(src: Path, dst: Path, rename) -> Path:
    """A copy of checkpoint ``src`` whose tensors are renamed by ``rename(name)`` (None drops one)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    out = {}
    for k, t in tensors.items():
        new = rename(k)
        if new is not None:
            out[new] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def strip_prefix(prefix: str):
    return lambda k: k[len(prefix) + 1:] if k.startswith(prefix + ".") else k


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def bakes_for(arch: str) -> list[tuple[str, dict, float | None]]:
    """Every baker the architecture takes: (method, options, coef)."""
    spec = spec_for({"model_type": arch})
    out: list[tuple[str, dict, float | None]] = []
    for site, route in spec.routes.items():
        if site == "attn-out" and spec.parallel_residual_key:  # the tiny GPT-NeoX is parallel
            continue
        engines = [e for e, v in route.engines.items() if v != "drop"]
        out.append(("bias", {"site": site, "target_engines": ",".join(engines)}, 2.0))
    if not spec.sandwich:
        out.append(("ortho", {}, None))
        if "resid-out" in spec.routes:
            engines = [e for e, v in spec.routes["resid-out"].engines.items() if v != "drop"]
            out.append(("ortho", {"add": 1.5, "target_engines": ",".join(engines)}, None))
    out.append(("bias", {"route": "rank1", "calibration": "prompts"}, 2.0))
    return out


def _layer(arch: str, opts: dict) -> int:
    spec = spec_for({"model_type": arch})
    route = spec.routes.get(opts.get("site", "")) if opts.get("route") != "rank1" else None
    return 3 if route is not None and route.layer_type else 2  # Qwen3.5: block 3 is full attention


@pytest.mark.parametrize("arch", ARCH_TYPES)
def test_every_baker_gives_the_same_weights_without_the_base_prefix(arch, tiny_models, tmp_path):
    """Each bake of a prefix-less copy writes the same tensors as the bake of the original, under
    the copy's own (prefix-less) names, and loads in transformers to the same logits."""
    src = tiny_models(arch)
    prefix = spec_for(json.loads((src / "config.json").read_text())).base_prefix
    bare = renamed_copy(src, tmp_path / "bare", strip_prefix(prefix))
    before = tree_digest(bare)
    v = vec(src, seed=11)
    for k, (method, opts, coef) in enumerate(bakes_for(arch)):
        layer = _layer(arch, opts)
        a = bake(method, src, [(v, layer, coef)], tmp_path / f"a{k}", progress=False, **opts)
        b = bake(method, bare, [(v, layer, coef)], tmp_path / f"b{k}", progress=False, **opts)
        ta, tb = tensors_of(a), tensors_of(b)
        assert {strip_prefix(prefix)(n) for n in ta} == set(tb), (method, opts)
        assert not any(n.startswith(prefix + ".") for n in tb)  # the checkpoint's own naming
        for n, t in ta.items():
            assert torch.equal(tb[strip_prefix(prefix)(n)], t), (method, opts, n)
        if opts.get("target_engines", "transformers").startswith("transformers"):
            assert (logits(reload_strict(b)) - logits(reload_strict(a))).abs().max() < 1e-5
    assert tree_digest(bare) == before


def test_gpt2_as_published_bakes_with_bias_and_ortho(tiny_models, tmp_path):
    """GPT-2 on the Hub: ``h.N.*``, ``wte.weight``, tied embeddings and no ``lm_head``. The bias
    bake that crashed with ``KeyError: 'transformer.h.1.mlp.c_proj.weight'`` now bakes, matches
    runtime steering, and ortho unties the head under the name transformers loads."""
    src = tiny_models("gpt2", tie_word_embeddings=True)
    hub = renamed_copy(src, tmp_path / "hub", lambda k: None if k == "lm_head.weight"
                       else strip_prefix("transformer")(k))
    assert "h.1.mlp.c_proj.weight" in tensors_of(hub) and "wte.weight" in tensors_of(hub)
    v = vec(src, seed=12)
    out = bake("bias", hub, [(v, 2, 3.0)], tmp_path / "bias", progress=False)
    ref = load_model(src)
    with steer(ref, v, 2, 3.0):
        want = logits(ref)
    assert (logits(reload_strict(out)) - want).abs().max() < 1e-4
    assert "h.1.mlp.c_proj.bias" in tensors_of(out)

    out = bake("ortho", hub, [(v, 2, None)], tmp_path / "ortho", progress=False)
    t = tensors_of(out)
    assert "lm_head.weight" in t and torch.equal(t["lm_head.weight"], tensors_of(hub)["wte.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reload_strict(out)


def test_names_follow_transformers_rules():
    spec = spec_for({"model_type": "gpt2"})
    tn = TensorNames(["h.1.mlp.c_proj.weight", "wte.weight", "wpe.weight"], spec)
    assert tn.resolve("transformer.h.1.mlp.c_proj.weight") == "h.1.mlp.c_proj.weight"
    assert tn.to_checkpoint("transformer.h.1.mlp.c_proj.bias") == "h.1.mlp.c_proj.bias"
    assert tn.to_checkpoint("lm_head.weight") == "lm_head.weight"  # not under the base model
    assert tn.resolve("h.1.mlp.c_proj.weight") == "h.1.mlp.c_proj.weight"  # a checkpoint name too
    full = TensorNames(["transformer.h.1.mlp.c_proj.weight"], spec)
    assert full.to_checkpoint("transformer.h.1.mlp.c_proj.bias") == "transformer.h.1.mlp.c_proj.bias"
    mix = spec_for({"model_type": "mixtral"})
    old = TensorNames(["model.layers.0.block_sparse_moe.experts.0.w2.weight"], mix)
    assert old.resolve("model.layers.0.mlp.experts.0.w2.weight") == \
        "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    with pytest.raises(TensorNameError, match=r"no tensor for transformer.h.0.attn.c_proj.weight.*"
                                              r"looked for .*h.0.attn.c_proj.weight"):
        tn.resolve("transformer.h.0.attn.c_proj.weight")


@pytest.mark.parametrize("method", ["bias", "ortho", "rank1"])
def test_an_unresolvable_name_is_a_clear_error_not_a_key_error(method, tiny_models, tmp_path):
    src = tiny_models("llama")
    odd = renamed_copy(src, tmp_path / "odd", lambda k: k.replace("layers.1.mlp.down_proj", "layers.1.mlp.dp"))
    opts = {"route": "rank1", "calibration": "prompts"} if method == "rank1" else {}
    coef = None if method == "ortho" else 1.0
    with pytest.raises(ValueError, match=r"no tensor for model.layers.1.mlp.down_proj.weight") as e:
        bake("ortho" if method == "ortho" else "bias", odd, [(vec(src), 2, coef)], tmp_path / "o",
             progress=False, **opts)
    assert not isinstance(e.value, KeyError)
    assert not (tmp_path / "o").exists()


def test_experts_stored_fused_or_per_expert_bake_alike(tiny_models, tmp_path):
    """A MoE checkpoint may store one weight per expert (what transformers 5.24 saves) or the
    fused 3-D tensor the module holds: ortho edits either and loads to the same model."""
    src = tiny_models("qwen3_moe")
    spec = spec_for(json.loads((src / "config.json").read_text()))
    model = load_model(src)
    fused = tmp_path / "fused"
    shutil.copytree(src, fused)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, fused / "model.safetensors", metadata={"format": "pt"})
    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        assert f"{spec.block(1)}.mlp.experts.down_proj" in set(f.keys())
    v = vec(src, seed=13)
    a = bake("ortho", src, [(v, 2, None)], tmp_path / "a", progress=False)
    b = bake("ortho", fused, [(v, 2, None)], tmp_path / "b", progress=False)
    assert (logits(reload_strict(a)) - logits(reload_strict(b))).abs().max() < 1e-5
    assert (logits(reload_strict(a)) - logits(model)).abs().max() > 1e-3
