"""Multimodal wrappers (Qwen3_5ForConditionalGeneration, Gemma3ForConditionalGeneration): the
bakers edit the text tower and keep everything else (vision tower, projector, processor files)
byte for byte; the export loads as the same class."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bakery.arch import UnsupportedArchitecture, spec_for
from bakery.bakers import bake
from bakery.bakers.errors import BakeError
from bakery.models import load_model
from bakery.steering.hooks import Ablation, blocks_of
from bakery.vectors.artifact import VectorArtifact
from helpers import logits, reload_strict
from helpers import held_out_fidelity
from tiny import make_tiny_multimodal

TEXT_PREFIXES = ("model.language_model.", "language_model.", "lm_head.")


@pytest.fixture(scope="module")
def wrappers(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = make_tiny_multimodal(model_type, tmp_path_factory.mktemp(model_type))
        return built[model_type]

    return get


def _vec(seed: int = 0) -> VectorArtifact:
    return VectorArtifact(torch.randn(5, 32, generator=torch.Generator().manual_seed(seed)), {"trait": "t"})


def _raw(folder: Path) -> dict[str, bytes]:
    """Every tensor's stored bytes (dtype and shape included)."""
    out = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return out


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", "README.md")}


def _check_kept(src: Path, out: Path) -> None:
    """Non-text tensors and the source's other files are byte-identical; the export loads as the
    wrapper class with no missing or unexpected keys."""
    from transformers import AutoModelForImageTextToText

    a, b = _raw(src), _raw(out)
    other = [k for k in a if not k.startswith(TEXT_PREFIXES)]
    assert other and all(a[k] == b[k] for k in other)
    assert not [k for k in b if k not in a and not k.startswith(TEXT_PREFIXES)]
    src_files, out_files = _files(src), _files(out)
    assert all(out_files[n] == h for n, h in src_files.items()), "auxiliary files changed"
    cfg_a, cfg_b = (json.loads((f / "config.json").read_text()) for f in (src, out))
    assert cfg_b["architectures"] == cfg_a["architectures"] and cfg_b["vision_config"] == cfg_a["vision_config"]
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == cfg_a["architectures"][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    card = (out / "README.md").read_text()  # the card's usage loads the wrapper, not its text tower
    assert "AutoModelForImageTextToText.from_pretrained" in card and "AutoModelForCausalLM" not in card


def test_the_wrapper_spec_places_the_text_tower(wrappers):
    q = spec_for(json.loads((wrappers("qwen3_5") / "config.json").read_text()))
    assert q.blocks == "model.language_model.layers" and q.attn_out_types and q.lm_head == "lm_head"
    g = spec_for(json.loads((wrappers("gemma3") / "config.json").read_text()))
    assert g.sandwich and g.embeddings == ("model.language_model.embed_tokens",)
    model = load_model(wrappers("gemma3"))  # transformers loads Gemma 3 as the wrapper class
    assert len(blocks_of(model)) == 4
    with pytest.raises(UnsupportedArchitecture, match="multimodal wrapper.*qwen3_5"):
        spec_for({"model_type": "llava", "text_config": {"model_type": "llama"}})


def test_qwen3_5_wrapper_attn_out_bias_bakes_the_text_tower(wrappers, tmp_path):
    src = wrappers("qwen3_5")
    v = _vec(1)
    out = bake("bias", src, [(v, 3, 2.0)], tmp_path / "out", site="attn-out",
               target_engines="transformers", progress=False)
    _check_kept(src, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["attention_bias"] is True
    assert "model.language_model.layers.3.self_attn.o_proj.bias" in _raw(out)
    ref = load_model(src)  # Qwen3_5ForCausalLM: the text tower
    spec = spec_for(ref.config)
    attn = blocks_of(ref)[3].get_submodule(spec.attn_writer(ref.config, 3))
    h = attn.register_forward_hook(lambda m, a, o: o + 2.0 * v.vectors[3])  # o_proj's output
    try:
        want = logits(ref)
    finally:
        h.remove()
    assert (logits(ref) - want).abs().max() > 1e-3
    err = float((logits(reload_strict(out)) - want).abs().max())
    print(f"FIGURE qwen3_5 wrapper bias attn-out: max logit error {err:.2e}")
    assert err < 1e-4


def test_qwen3_5_wrapper_ortho_matches_ablation_of_the_text_tower(wrappers, tmp_path):
    src = wrappers("qwen3_5")
    v = _vec(2)
    out = bake("ortho", src, [(v, 2, None)], tmp_path / "out", progress=False)
    _check_kept(src, out)
    ref = load_model(src)
    with Ablation(ref, v.vectors[2]):
        want = logits(ref)
    err = float((logits(reload_strict(out)) - want).abs().max())
    print(f"FIGURE qwen3_5 wrapper ortho: max logit error {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("model_type", ["qwen3_5", "gemma3"])
def test_rank1_on_a_wrapper_beats_the_unedited_model(model_type, wrappers, tmp_path):
    src = wrappers(model_type)
    v = _vec(3)
    out = bake("bias", src, [(v, 2, 2.0)], tmp_path / "out", route="rank1", progress=False)
    _check_kept(src, out)
    res = held_out_fidelity(src, out, v, 2, 2.0)
    print(f"FIGURE {model_type} wrapper rank1: R {res.recovered:.3f}")
    assert res.recovered > 0.05, res.to_dict()
    if model_type == "gemma3":  # the export keeps the checkpoint's own (older) layout
        assert "language_model.model.layers.1.mlp.down_proj.weight" in _raw(out)


def test_gemma3_wrapper_exact_routes_are_refused_for_the_sandwich_norm(wrappers, tmp_path):
    src = wrappers("gemma3")
    with pytest.raises(BakeError, match="sandwich norm.*rank1"):
        bake("bias", src, [(_vec(), 2, 1.0)], tmp_path / "o", progress=False)
    with pytest.raises(BakeError, match="sandwich norm.*kl-lora"):
        bake("ortho", src, [(_vec(), 2, None)], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# ---- distilled bakes: the text tower trains, everything else is the source's ----------------------
def _distill(src: Path, tmp_path: Path, method: str, **kw) -> Path:
    vf = tmp_path / "v.safetensors"
    _vec(5).save(vf)
    train = dict(rank=8, lr=5e-3) if method == "kl-lora" else dict(lr=1e-3)
    train.update(kw)
    return bake(method, str(src), [(str(vf), 2, 2.0)], tmp_path / "out", num_prompts=30, samples_per_prompt=1,
                max_new_tokens=6, steps=3, val_prompts=6, val_every=3, positions="all",
                work_dir=str(tmp_path / "work"), progress=False, **train)


@pytest.mark.parametrize("method", ["kl-lora", "kl-full"])
@pytest.mark.parametrize("model_type", ["qwen3_5", "gemma3"])
def test_distilled_export_of_a_wrapper_keeps_the_vision_tower(model_type, method, wrappers, tmp_path):
    src = wrappers(model_type)
    out = _distill(src, tmp_path, method)
    _check_kept(src, out)  # vision tower, projector and processor files byte for byte; same class
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    a, b = _raw(src), _raw(out)
    assert a.keys() == b.keys()
    changed = [k for k in a if a[k] != b[k]]
    assert changed and all(k.startswith(TEXT_PREFIXES) for k in changed)
    m = json.loads((out / "bakery.json").read_text())["extra"]
    assert m["tensors_replaced"] == len(changed) and any("vision tower" in n for n in m["notes"])


@pytest.mark.parametrize("model_type", ["qwen3_5", "gemma3"])
def test_a_wrappers_adapter_loads_onto_the_wrapper_and_matches_the_merged_export(model_type, wrappers, tmp_path):
    """adapter/ targets the text tower's blocks only (Gemma 3's vision tower has q_proj too) in
    the wrapper's module tree (Qwen3.5 trains as Qwen3_5ForCausalLM)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    src = wrappers(model_type)
    out = _distill(src, tmp_path, "kl-lora")
    ids = torch.randint(7, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForImageTextToText.from_pretrained(out)(input_ids=ids).logits
        base_model = AutoModelForImageTextToText.from_pretrained(src)
        base = base_model(input_ids=ids).logits
        adapted_model = PeftModel.from_pretrained(base_model, str(out / "adapter"))
        adapted = adapted_model(input_ids=ids).logits
    lora_modules = [n for n, _ in adapted_model.named_modules() if n.endswith(".lora_A")]
    assert lora_modules and all(".language_model." in n for n in lora_modules), lora_modules[:3]
    assert (merged - base).abs().max() > 1e-3
    err = float((adapted - merged).abs().max())
    print(f"FIGURE {model_type} wrapper kl-lora: adapter vs merged max logit error {err:.2e}")
    assert err < 1e-4


def test_a_wrapper_export_in_another_dtype_is_refused(wrappers, tmp_path):
    from bakery.errors import BakeryError

    with pytest.raises(BakeryError, match="dtype=bfloat16.*vision tower"):
        _distill(wrappers("qwen3_5"), tmp_path, "kl-lora", dtype="bfloat16")
    assert not (tmp_path / "out").exists()


def test_the_overlay_replaces_exactly_the_tensors_that_differ(wrappers, tmp_path):
    """write_overlay: a trained tensor that equals the source keeps the source's bytes, one that
    differs replaces it, one with no place in the source is an error (nothing half-written)."""
    from safetensors.torch import save_file

    from bakery.io.checkpoint import CheckpointError
    from bakery.bakers.plan import write_overlay

    src = wrappers("qwen3_5")
    config = json.loads((src / "config.json").read_text())
    a = _raw(src)
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        same, edited = f.get_tensor("lm_head.weight"), f.get_tensor(name) + 1.0
    trained = tmp_path / "trained"
    trained.mkdir()
    save_file({"lm_head.weight": same, name: edited}, str(trained / "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    assert write_overlay(out, src, config, trained) == [name]
    b = _raw(out)
    assert [k for k in a if a[k] != b[k]] == [name] and a.keys() == b.keys()
    save_file({"model.language_model.layers.9.mlp.down_proj.weight": edited}, str(trained / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.9.*no tensor of that shape"):
        write_overlay(tmp_path / "out2", src, config, trained)
