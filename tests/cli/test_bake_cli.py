"""``bakery bake``: the forms from the mission, recipes with flag overrides, clear errors."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from bakery.bakers.recipes import BakeRecipeError, from_dict, load_bake_recipe
from bakery.cli import main
from bakery.io.manifest import Manifest
from helpers import vec


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
    assert m.terms[0].coef == 3.0 and m.command.startswith("bakery bake --method bias --model")


def test_default_output_under_exports(setup):
    src, vpath, tmp = setup
    code, out = run("--method", "ortho", "--layer", 2, "--vector", vpath, "--model", src)
    assert code == 0, out
    made = list((tmp / "exports").iterdir())
    assert [p.name for p in made] == [f"{src.name}-pirate-ortho-L2"]
    assert "both of its poles" in out


def test_trait_form_resolves_through_the_extraction_cache(setup, monkeypatch):
    src, vpath, tmp = setup
    import bakery.extraction.extract as ex

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
    from bakery.bakers.recipes import available_bakes

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
    from bakery.vectors.artifact import VectorArtifact

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
    assert r.exit_code == 2 and "--steps is for --method kl-lora / kl-full" in r.output
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
    from bakery.vectors.artifact import VectorArtifact

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


# ---- the recorded command reproduces the bake; a missing --coef is an error, never 1.0 -------------
def _weights(folder):
    """Every weight tensor of an export (its vectors/ and side files aside)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    assert out, f"no weights in {folder}"
    return out


def _same_weights(a, b):
    import torch

    wa, wb = _weights(a), _weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def _rerun(folder, new_out):
    """Run the command recorded in ``folder``'s manifest again, into ``new_out``."""
    import shlex

    cmd = json.loads((folder / "bakery.json").read_text())["command"]
    args = shlex.split(cmd)
    assert args[:2] == ["bakery", "bake"], cmd
    args = args[2:]
    flags = [f for f in ("-o", "--output") if f in args]
    assert len(flags) == 1, cmd
    args[args.index(flags[0]) + 1] = str(new_out)
    res = CliRunner().invoke(main, ["bake", *args])
    return cmd, args, res


@pytest.mark.parametrize("extra", [
    ["--method", "bias", "--coef", "0.123456789"],  # a float that %g would round
    ["--method", "bias", "--coef", "3", "--site", "attn-out", "--target-engine", "transformers,vllm",
     "--shard-size", "50KB"],
    ["--method", "bias", "--route", "rank1", "--coef", "3", "--positions", "response"],
    ["--method", "ortho", "--per-layer", "--blocks", "1-2", "--embeddings", "keep"],
])
def test_cli_recorded_command_reruns_to_the_same_weights(setup, extra):
    src, vpath, tmp = setup
    code, out = run(*extra, "--vector", vpath, "--layer", 2, "--model", src, "-o", "exports/first")
    assert code == 0, out
    cmd, args, res = _rerun(tmp / "exports" / "first", tmp / "exports" / "again")
    assert "()" not in cmd and "--set" not in cmd, cmd  # an empty repeatable option is left out
    assert res.exit_code == 0, (cmd, res.output)
    assert _same_weights(tmp / "exports" / "first", tmp / "exports" / "again")
    first, again = (Manifest.load(tmp / "exports" / n) for n in ("first", "again"))
    assert [(t.layer, t.coef) for t in first.terms] == [(t.layer, t.coef) for t in again.terms]
    if "0.123456789" in extra:
        assert first.terms[0].coef == 0.123456789 and "0.123456789" in args


def test_cli_recorded_command_repeats_each_set_item(tiny_models, tmp_path, monkeypatch):
    """--set is repeatable: one `--set KEY=VALUE` per item, each quoted, and the re-run works."""
    import torch

    from bakery.vectors.artifact import VectorArtifact

    monkeypatch.chdir(tmp_path)
    d = tiny_models("llama")
    torch.manual_seed(0)
    v = VectorArtifact(torch.randn(5, 32) * 3, {"trait": "pirate"}).save(tmp_path / "v.safetensors")
    first = tmp_path / "kl"
    r = CliRunner().invoke(main, [
        "bake", "--method", "kl-lora", "-v", str(v), "-l", "2", "-c", "2", "--model", str(d),
        "--steps", "1", "--rank", "8", "--set", "num_prompts=12", "--set", "val_prompts=4",
        "--set", "max_new_tokens=6", "--set", "checkpoint_every=0", "--set", "lr=1e-4",
        "-o", str(first)])
    assert r.exit_code == 0, r.output
    cmd, args, res = _rerun(first, tmp_path / "kl-again")
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    # in the order kl-lora's config declares them
    assert sets == ["num_prompts=12", "max_new_tokens=6", "val_prompts=4", "lr=0.0001",
                    "checkpoint_every=0"], cmd
    assert res.exit_code == 0, (cmd, res.output)
    m = json.loads((tmp_path / "kl-again" / "bakery.json").read_text())
    assert m["method"] == "kl-lora" and m["terms"][0]["coef"] == 2.0


def test_missing_coef_is_an_error_not_one(setup):
    src, vpath, tmp = setup
    for args, how in [([], "--method bias"), (["--route", "rank1"], "--method bias")]:
        code, out = run("--method", "bias", *args, "--vector", vpath, "--layer", 2, "--model", src,
                        "-o", "exports/nocoef")
        assert code == 2 and f"--coef is required for {how}:" in out and "bakery sweep" in out, out
        assert not (tmp / "exports" / "nocoef").exists()
    code, out = run("--method", "kl-lora", "--vector", vpath, "--layer", 2, "--model", src,
                    "--steps", 1, "-o", "exports/nocoef")
    assert code == 2 and "--coef is required for --method kl-lora" in out, out
    assert not (tmp / "exports" / "nocoef").exists()
    code, out = run("--method", "ortho", "--vector", vpath, "--layer", 2, "--model", src, "-o", "exports/o")
    assert code == 0, out  # ortho removes a direction: no strength to give


def test_recipe_without_coef_is_an_error_unless_the_flag_gives_one(setup):
    src, vpath, tmp = setup
    assert from_dict({"method": "bias", "trait": "x", "layer": 2}).terms[0].coef is None
    assert from_dict({"method": "bias", "trait": "x", "layer": 2, "coef": 0}).terms[0].coef == 0.0
    (tmp / "r.yaml").write_text(yaml.safe_dump({
        "model": str(src), "method": "bias", "vector": "pirate.safetensors", "layer": 2,
        "output": "exports/r"}))
    code, out = run("--recipe", tmp / "r.yaml")
    assert code == 2 and "--coef is required for --method bias" in out and "r.yaml" in out, out
    assert not (tmp / "exports" / "r").exists()
    code, out = run("--recipe", tmp / "r.yaml", "--coef", 2.5)
    assert code == 0, out
    assert Manifest.load(tmp / "exports" / "r").terms[0].coef == 2.5
    (tmp / "m.yaml").write_text(yaml.safe_dump({
        "model": str(src), "method": "bias", "output": "exports/m",
        "terms": [{"vector": str(vpath), "layer": 1, "coef": 1.0}, {"vector": str(vpath), "layer": 3}]}))
    code, out = run("--recipe", tmp / "m.yaml")
    assert code == 2 and "term 1 has no coef" in out and "--coef is required" in out, out
    assert not (tmp / "exports" / "m").exists()


def test_library_bake_refuses_a_missing_coef(setup):
    from bakery.bakers import bake
    from bakery.bakers.errors import BakeError

    src, vpath, tmp = setup
    for term in [{"vector": vpath, "layer": 2}, (vpath, 2, None)]:
        with pytest.raises(BakeError, match="--coef is required for --method bias"):
            bake("bias", src, [term], tmp / "lib", progress=False)
        assert not (tmp / "lib").exists()
    with pytest.raises(BakeError, match="--coef is required for --method bias"):
        bake("bias", src, [(vpath, 2, None)], tmp / "lib", route="rank1", progress=False)
    out = bake("ortho", src, [{"vector": vpath, "layer": 2}], tmp / "o", progress=False)
    assert Manifest.load(out).method == "ortho"


@pytest.mark.parametrize("options, flags", [
    (dict(positions="response"), ["--positions", "response"]),
    (dict(ridge=0.5, calibration_tokens=8), ["--set", "ridge=0.5", "calibration_tokens=8"]),  # no flags
])
def test_library_reproduce_command_keeps_rank1_options(setup, options, flags):
    """bake(route="rank1", positions=..., ridge=...) records a command that redoes that bake, not
    the ungated / default-ridge one."""
    from bakery.bakers import bake

    src, vpath, tmp = setup
    first = bake("bias", src, [(vpath, 2, 3.0)], tmp / "first", route="rank1", progress=False, **options)
    default = bake("bias", src, [(vpath, 2, 3.0)], tmp / "default", route="rank1", progress=False)
    assert not _same_weights(first, default)  # the options matter
    cmd, args, res = _rerun(first, tmp / "again")
    assert all(f in args for f in flags), cmd
    assert res.exit_code == 0, (cmd, res.output)
    assert _same_weights(first, tmp / "again"), cmd
    again = json.loads((tmp / "again" / "bakery.json").read_text())
    assert again["positions"] == options.get("positions", "all") and again["route"] == "rank1"


# ---- one contract per baker: a flag of another method is refused, never dropped ---------------------
def _help_flags():
    """Each method-specific flag ``bakery bake --help`` lists, with the methods its help names."""
    import re

    res = CliRunner().invoke(main, ["bake", "--help"], terminal_width=400)
    assert res.exit_code == 0
    flags = {}
    for m in re.finditer(r"^\s+(?:-\w, )?(--[\w-]+)(?: \S+)?\s+\[([\w, -]+)\]", res.output, re.M):
        flags[m.group(1)] = [x.strip() for x in m.group(2).split(",")]
    return flags


_VALUE = {"--route": "rank1", "--site": "attn-out", "--target-engine": "transformers",
          "--calibration": "prompts", "--positions": "all", "--embeddings": "keep", "--blocks": "1-2",
          "--add": "1.5", "--steps": "2", "--rank": "8", "--teacher-engine": "vllm", "--coef": "2"}


@pytest.mark.parametrize("method", ["bias", "ortho", "kl-lora", "kl-full"])
def test_every_flag_of_another_method_is_refused(setup, method):
    src, vpath, tmp = setup
    flags = _help_flags()
    assert {"--route", "--site", "--add", "--blocks", "--rank", "--steps", "--coef", "--per-layer"} <= set(flags)
    foreign = [f for f, methods in flags.items() if method not in methods]
    assert foreign, flags
    coef = [] if method == "ortho" else ["--coef", "2"]
    for flag in foreign:
        value = [] if flag == "--per-layer" else [_VALUE[flag]]
        args = ["--method", method, "-v", vpath, "-l", 2, *(c for c in coef if flag != "--coef"),
                flag, *value, "--model", src, "-o", tmp / "x"]
        code, out = run(*args)
        assert code == 2, (flag, out)
        takers = " / ".join(flags[flag])
        assert f"{flag} is for --method {takers}" in out, (flag, out)
        assert not (tmp / "x").exists()


@pytest.mark.parametrize("method, extra", [
    ("bias", ["--set", "ridge=0.5", "--route", "bias"]),  # a rank1-only setting without rank1
    ("bias", ["--calibration", "prompts"]),
    ("ortho", ["--target-engine", "vllm"]),  # only meaningful with --add
    ("kl-full", ["--set", "rank=8"]),
    ("kl-full", ["--set", "alpha=16"]),  # LoRA only
    ("bias", ["--set", "no_such_setting=1"]),
])
def test_settings_a_method_does_not_use_are_refused(setup, method, extra):
    src, vpath, tmp = setup
    coef = [] if method == "ortho" else ["--coef", "2"]
    code, out = run("--method", method, "-v", vpath, "-l", 2, *coef, *extra, "--model", src, "-o", tmp / "x")
    assert code == 2 and "error:" in out, out
    assert not (tmp / "x").exists()


def test_a_recipe_option_of_another_method_is_refused(setup):
    src, vpath, tmp = setup
    (tmp / "r.yaml").write_text(yaml.safe_dump({
        "model": str(src), "method": "ortho", "vector": str(vpath), "layer": 2, "rank": 8, "output": "o"}))
    code, out = run("--recipe", tmp / "r.yaml")
    assert code == 2 and "--rank is for --method kl-lora; --method ortho does not take it" in out, out


_DISTILL = ["--steps", "2", "--set", "num_prompts=14", "--set", "val_prompts=4", "--set", "max_new_tokens=5",
            "--set", "checkpoint_every=0"]


@pytest.mark.parametrize("method, extra", [
    ("bias", ["--coef", "2.5"]),
    ("bias", ["--coef", "2", "--route", "rank1", "--calibration", "prompts", "--set", "ridge=0.05"]),
    ("ortho", ["--add", "1.5", "--blocks", "0-2"]),
    ("kl-lora", ["--coef", "2", "--rank", "8", *_DISTILL]),
    ("kl-full", ["--coef", "2", *_DISTILL, "--set", "lr=0.0001"]),
])
def test_every_methods_recorded_command_reruns_to_byte_identical_weights(setup, method, extra):
    """The reproduce rule is one for every method, closed-form and distilled: the command recorded
    in bakery.json (and the card) redoes the bake from the export's own vector file."""
    src, vpath, tmp = setup
    code, out = run("--method", method, "-v", vpath, "-l", 2, *extra, "--model", src, "-o", tmp / "first")
    assert code == 0, out
    first = tmp / "first"
    cmd, args, res = _rerun(first, tmp / "again")
    assert str(vpath) not in cmd and f"{first}/vectors/" in cmd, cmd
    assert res.exit_code == 0, (cmd, res.output)
    assert _same_weights(first, tmp / "again"), cmd
    assert cmd in (first / "README.md").read_text()  # the card shows the same command
    a, b = (json.loads((f / "bakery.json").read_text()) for f in (first, tmp / "again"))
    assert a["options"] == b["options"] and bool(a["options"]) == (len(extra) > 2), a["options"]
    assert yaml.safe_load((first / "bake.yaml").read_text()).get("options", {}) == a["options"]
