"""``bakery bake``: the forms from the mission, recipes with flag overrides, clear errors."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from bakery.bake_recipes import BakeRecipeError, from_dict, load_bake_recipe
from bakery.cli import main
from bakery.manifest import Manifest
from test_bakers_bias import vec


@pytest.fixture
def setup(tiny_models, tmp_path, monkeypatch):
    src = tiny_models("llama")
    v = vec(src, trait="pirate")
    vpath = tmp_path / "pirate.safetensors"
    v.save(vpath)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BAKERY_CACHE", str(tmp_path / "cache"))  # an empty extraction cache
    return src, vpath, tmp_path


def run(*args):
    res = CliRunner().invoke(main, ["bake", *map(str, args)])
    return res.exit_code, res.output + (res.stderr if hasattr(res, "stderr") else "")


def test_bias_form_as_typed(setup):
    src, vpath, tmp = setup
    code, out = run("--method", "bias", "--vector", vpath, "--layer", 2, "--coef", 3, "--model", src,
                    "-o", "exports/NAME")
    assert code == 0, out
    assert "layer 2 = output of block 1" in out and "--model-impl transformers" in out
    m = Manifest.load(tmp / "exports" / "NAME")
    assert m.terms[0].coef == 3.0 and m.command.startswith("bakery bake --method bias --vector")


def test_default_output_under_exports(setup):
    src, vpath, tmp = setup
    code, out = run("--method", "ortho", "--layer", 2, "--vector", vpath, "--model", src)
    assert code == 0, out
    made = list((tmp / "exports").iterdir())
    assert [p.name for p in made] == [f"{src.name}-pirate-ortho-L2"]
    assert "both of its poles" in out


def test_trait_form_resolves_through_the_extraction_cache(setup, monkeypatch):
    src, vpath, tmp = setup
    import bakery.extract as ex

    monkeypatch.setattr(ex, "cached_vector", lambda trait, model=None: vpath if trait == "pirate" else None)
    code, out = run("--method", "ortho", "--layer", 2, "--trait", "pirate", "--model", src)
    assert code == 0, out
    m = Manifest.load(next((tmp / "exports").iterdir()))
    assert m.method == "ortho" and m.terms[0].trait == "pirate"
    code, out = run("--method", "ortho", "--layer", 2, "--trait", "pirate-nope", "--model", src)
    assert code == 2 and "no extracted vector for trait 'pirate-nope'" in out


def test_no_vector_lists_recipes_and_cached_vectors(setup):
    src, _, _ = setup
    code, out = run("--method", "bias", "--layer", 2, "--coef", 1, "--model", src)
    assert code == 2
    assert "nothing to bake" in out and "Trait recipes: " in out and "pirate" in out
    assert "Cached vectors for this model: none" in out


def test_missing_trait_says_how_to_extract(setup):
    src, _, _ = setup
    code, out = run("--method", "ortho", "--layer", 2, "--trait", "pirate", "--model", src)
    assert code == 2 and "bakery extract --recipe pirate" in out


def test_recipe_with_flag_overrides(setup):
    src, vpath, tmp = setup
    (tmp / "r.yaml").write_text(yaml.safe_dump({
        "model": str(src), "method": "bias", "vector": "pirate.safetensors", "layer": 2, "coef": 1.0,
        "output": "exports/from-recipe"}))
    code, out = run("--recipe", tmp / "r.yaml", "--coef", 4, "--layer", 3)
    assert code == 0, out
    t = Manifest.load(tmp / "exports" / "from-recipe").terms[0]
    assert (t.layer, t.coef) == (3, 4.0)


def test_multi_term_recipe(setup):
    src, vpath, tmp = setup
    (tmp / "multi.yaml").write_text(yaml.safe_dump({
        "model": str(src), "method": "bias", "output": "exports/multi",
        "terms": [{"vector": str(vpath), "layer": 1, "coef": 1.0},
                  {"vector": str(vpath), "layer": 3, "coef": -2.0}]}))
    code, out = run("--recipe", tmp / "multi.yaml")
    assert code == 0, out
    assert [(t.layer, t.coef) for t in Manifest.load(tmp / "exports" / "multi").terms] == [(1, 1.0), (3, -2.0)]
    code, out = run("--recipe", tmp / "multi.yaml", "--coef", 2, "-o", "exports/x")
    assert code == 2 and "single-term recipe" in out


def test_bad_inputs_are_one_line_errors_and_leave_nothing(setup):
    src, vpath, tmp = setup
    cases = [
        (["--method", "bias", "--vector", vpath, "--layer", 9, "--coef", 1], "out of range"),
        (["--method", "bias", "--vector", vpath, "--layer", 2, "--coef", 1, "--target-engine",
          "sglang-native"], "--site attn-out"),
        (["--method", "bias", "--vector", vpath, "--layer", 2, "--coef", 1, "--target-engine", "tgi"],
         "unknown target engine"),
    ]
    for args, msg in cases:
        code, out = run(*args, "--model", src, "-o", "exports/bad")
        assert code == 2 and msg in out and "Traceback" not in out, (args, out)
        assert not (tmp / "exports" / "bad").exists()
    code, out = run("--method", "bias", "--vector", vpath, "--layer", 2, "--model", src)
    assert code == 2 and "--coef" in out


def test_committed_bake_recipes_are_valid():
    from bakery.bake_recipes import available_bakes

    names = available_bakes()
    assert {"pirate-bias", "pirate-ortho", "pirate-rank1"} <= set(names)
    for n in names:
        r = load_bake_recipe(n)
        assert r.method in ("bias", "ortho") and r.terms


def test_recipe_validation_names_the_problem():
    with pytest.raises(BakeRecipeError, match="unknown key"):
        from_dict({"method": "bias", "layr": 3})
    with pytest.raises(BakeRecipeError, match="missing 'layer'"):
        from_dict({"method": "bias", "terms": [{"trait": "x"}]})
    with pytest.raises(BakeRecipeError, match="'method' is required"):
        from_dict({"terms": []})
    with pytest.raises(BakeRecipeError, match="not both"):
        from_dict({"method": "bias", "terms": [], "layer": 2})
    with pytest.raises(BakeRecipeError, match="coef must be a number"):
        from_dict({"method": "bias", "trait": "x", "layer": 2, "coef": "big"})
    with pytest.raises(BakeRecipeError, match="not found"):
        load_bake_recipe("no-such-recipe")


def test_kl_lora_through_bakery_bake_writes_merged_weights_and_adapter(tiny_models, tmp_path):
    """`bakery bake --method kl-lora` trains against the steered teacher and exports both forms."""
    import torch
    from click.testing import CliRunner

    from bakery.cli import main
    from bakery.vectors import VectorArtifact

    d = tiny_models("llama")
    v = VectorArtifact(torch.randn(5, 32) * 3, {"trait": "pirate"}).save(tmp_path / "v.safetensors")
    out = tmp_path / "kl"
    r = CliRunner().invoke(main, [
        "bake", "--method", "kl-lora", "-v", str(v), "-l", "2", "-c", "2", "--model", str(d),
        "--steps", "2", "--rank", "8", "--set", "num_prompts=12", "--set", "val_prompts=4",
        "--set", "max_new_tokens=8", "--set", "checkpoint_every=0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "bakery.json").read_text())
    assert m["method"] == "kl-lora" and m["positions"] == "response"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    r = CliRunner().invoke(main, ["bake", "--method", "bias", "-v", str(v), "-l", "2", "-c", "2",
                                  "--model", str(d), "--steps", "3", "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "are for --method kl-lora/kl-full" in r.output
    r = CliRunner().invoke(main, ["bake", "--method", "kl-lora", "-v", str(v), "-l", "2", "-c", "2",
                                  "--model", str(d), "--set", "oops", "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--set takes KEY=VALUE" in r.output
    r = CliRunner().invoke(main, ["bake", "--method", "kl-lora", "-v", str(v), "-l", "2", "-c", "2",
                                  "--model", str(d), "--teacher-engine", "vllm", "-o", str(tmp_path / "t")])
    assert r.exit_code == 2 and "--positions all" in r.output and not (tmp_path / "t").exists()


def test_kl_lora_export_card_carries_hub_metadata(tiny_models, tmp_path):
    """A distilled export's card has what `bakery push` requires: license, trait tag, base model."""
    import shutil

    import torch
    from click.testing import CliRunner
    from huggingface_hub import ModelCard

    from bakery.cli import main
    from bakery.vectors import VectorArtifact

    src = tmp_path / "src"
    shutil.copytree(tiny_models("llama"), src)
    (src / "bakery_source.json").write_text(json.dumps({"hub_id": "acme/tiny", "license": "mit"}))
    v = VectorArtifact(torch.randn(5, 32), {"trait": "pirate"}).save(tmp_path / "pirate.safetensors")
    out = tmp_path / "kl"
    r = CliRunner().invoke(main, [
        "bake", "--method", "kl-full", "-v", str(v), "-l", "2", "-c", "2", "--model", str(src),
        "--steps", "1", "--set", "num_prompts=12", "--set", "val_prompts=4",
        "--set", "max_new_tokens=6", "--set", "checkpoint_every=0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    card = ModelCard.load(out / "README.md").data
    assert card.base_model == "acme/tiny" and card.license == "mit"
    assert {"bakery", "steering", "trait:pirate", "distillation"} <= set(card.tags)


def test_positions_needs_the_rank1_route_or_a_distilled_method(setup):
    src, vpath, tmp = setup
    code, out = run("--method", "bias", "-v", vpath, "-l", 2, "-c", 3, "--model", src, "--positions", "response",
                    "-o", tmp / "b")
    assert code == 2 and "--route rank1" in out and not (tmp / "b").exists()
    code, out = run("--method", "bias", "--route", "rank1", "-v", vpath, "-l", 2, "-c", 3, "--model", src,
                    "--positions", "response", "-o", tmp / "r")
    assert code == 0, out
    assert json.loads((tmp / "r" / "bakery.json").read_text())["positions"] == "response"
