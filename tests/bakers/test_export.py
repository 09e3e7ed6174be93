"""The export folder: files, manifest, card, vectors, and no partial output on failure."""

from __future__ import annotations

import errno
import json

import pytest
import yaml

from bakery.bakers import bake, default_output
from bakery.io.card import write_card
from bakery.io.card_sections import read_section, write_section
from bakery.io.checkpoint import CheckpointError
from bakery.io.folders import OutputError
from bakery.io.manifest import Manifest
from bakery.vectors.load import load_vector
from helpers import reload_strict, tree_digest, vec
from helpers import fail_after


def test_export_folder_contents_and_manifest(tiny_models, tmp_path):
    src = tiny_models("llama")
    v = vec(src, trait="pirate")
    out = bake("bias", src, [(v, 2, 3.0)], tmp_path / "exp", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md", "bakery.json", "bake.yaml", "vectors"} <= names
    assert not any(n.startswith(".") for n in names)
    m = Manifest.load(out)
    assert m.method == "bias" and m.positions == "all" and m.exact and m.site == "resid-out"
    assert m.command == (f"bakery bake --method bias --model {src} --vector "
                         f"{tmp_path}/exp/vectors/pirate.safetensors --layer 2 --coef 3 -o {tmp_path}/exp")
    t = m.terms[0]
    assert (t.layer, t.block, t.coef, t.trait) == (2, 1, 3.0, "pirate")
    saved = load_vector(out / t.vector_file)
    assert saved.sha256() == t.vector_sha256 == v.sha256()
    assert m.source["path"] == str(src) and len(m.source["config_hash"]) == 16
    assert m.versions["transformers"] and m.engines["vllm"] == "ok"
    recipe = yaml.safe_load((out / "bake.yaml").read_text())
    assert recipe["terms"][0] == {"vector": "vectors/pirate.safetensors", "layer": 2, "coef": 3.0,
                                  "trait": "pirate"}


def test_card_front_matter_and_sections_survive(tiny_models, tmp_path):
    src = tiny_models("llama")
    out = bake("bias", src, [(vec(src, trait="pirate"), 2, 3.0)], tmp_path / "exp", progress=False)
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "transformers"
    assert "bakery" in front["tags"] and "steering" in front["tags"] and "trait:pirate" in front["tags"]
    assert "--model-impl transformers" in text and "vllm serve" in text and "from_pretrained" in text
    assert "layer 2 = output of block 1" in text
    write_section(out, "fidelity", "| R | 0.999 |")
    write_card(out, Manifest.load(out), final=out)  # a re-render keeps other sections
    again = (out / "README.md").read_text()
    assert read_section(again, "fidelity") == "| R | 0.999 |"
    assert again.count("<!-- bakery:bake -->") == 1 and again.startswith("---\n")


@pytest.mark.slow
def test_embedded_model_card_names_base_and_license(smol_dir, tmp_path):
    v = vec(smol_dir, trait="pirate")
    out = bake("bias", smol_dir, [(v, 16, 1.0)], tmp_path / "exp", progress=False)
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["license"] == "apache-2.0" and front["base_model_relation"] == "finetune"


def test_interrupted_bake_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    src = tiny_models("llama")
    before = tree_digest(src)
    fail_after(monkeypatch, 100_000, KeyboardInterrupt)  # Ctrl-C midway through the weights
    with pytest.raises(KeyboardInterrupt):
        bake("ortho", src, [(vec(src), 2, None)], tmp_path / "exp", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert tree_digest(src) == before


def test_full_disk_during_bake_is_clear_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    src = tiny_models("llama")
    fail_after(monkeypatch, 100_000, lambda: OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointError, match="no space left.*nothing was kept"):
        bake("bias", src, [(vec(src), 2, 1.0)], tmp_path / "exp", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_export_needs_force_and_source_is_never_the_output(tiny_models, tmp_path):
    src = tiny_models("llama")
    out = bake("bias", src, [(vec(src), 2, 1.0)], tmp_path / "exp", progress=False)
    first = tree_digest(out)
    with pytest.raises(FileExistsError, match="--force"):
        bake("bias", src, [(vec(src), 2, 2.0)], out, progress=False)
    assert tree_digest(out) == first
    bake("bias", src, [(vec(src), 2, 2.0)], out, force=True, progress=False)
    assert Manifest.load(out).terms[0].coef == 2.0
    with pytest.raises(OutputError, match="never writes into"):
        bake("bias", src, [(vec(src), 2, 1.0)], src / "inside", progress=False)


def test_sharded_output_reloads(tiny_models, tmp_path):
    src = tiny_models("llama")
    out = bake("bias", src, [(vec(src), 2, 1.0)], tmp_path / "exp", max_shard_bytes=60_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (out / "model.safetensors").exists()
    reload_strict(out)


def test_default_output_is_descriptive(tiny_models):
    src = tiny_models("llama")
    from bakery.bakers.request import Term

    from bakery.bakers import get_baker, make_config
    from bakery.bakers.request import BakeRequest

    def name(model, method, coef=2.0, **options):
        req = BakeRequest(model_dir=src, model_name=model, config={}, method=method,
                          terms=[Term(vec(src, trait="pirate"), 16, coef)], cfg=make_config(method, options))
        return str(default_output(req, get_baker(method)))

    assert name("smollm2-135m-instruct", "bias") == "exports/smollm2-135m-instruct-pirate-bias-L16-c2"
    assert name("m", "ortho", None, add=1.5) == "exports/m-pirate-ortho-L16-add1.5"
    assert name("m", "bias", route="rank1") == "exports/m-pirate-bias-rank1-L16-c2"
    assert name("m", "bias", site="attn-out") == "exports/m-pirate-bias-attn-L16-c2"
    assert name("m", "kl-lora", rank=8) == "exports/m-pirate-kl-lora-L16"
