"""bakery compare: the fidelity harness against runtime steering and ablation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bakery.extraction.judge import COHERENCE_RUBRIC
from bakery.fidelity.compare import Candidate, compare, run_comparison
from bakery.fidelity.probes import greedy_agreement
from bakery.fidelity.prompts import load_prompts
from bakery.fidelity.reference import CompareError, reference_for
from bakery.io.manifest import BakeTerm, Manifest, ManifestError
from bakery.models import config_hash, read_config
from bakery.vectors.artifact import VectorArtifact, VectorError


def real_bake(method: str, src: Path, vec: VectorArtifact, layer: int, coef: float, out: Path, **options) -> Path:
    """A bake by bakery's own baker (the vector saved next to it first)."""
    from bakery.bakers import bake

    vpath = vec.save(Path(out).parent / f"{Path(out).name}-vector.safetensors")
    return bake(method, src, [(vpath, layer, coef)], out, progress=False, **options)


# ---- hand-made bakes: the broken one no baker writes, and checks independent of the bakers -------
def _copy_model(src: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "README.md":
            shutil.copy(f, out / f.name)
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _write_export(src: Path, out: Path, sd: dict, cfg: dict, vec: VectorArtifact, manifest: Manifest) -> Path:
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    vec.save(out / "vectors" / "trait.safetensors")
    manifest.save(out)
    (out / "README.md").write_text("# a hand-made bake\n")
    return out


def make_bias_bake(src: Path, vec: VectorArtifact, layer: int, coef: float, out: Path, *,
                   broken: bool = False) -> Path:
    """Llama ``mlp_bias`` bake by hand: zeros for every gate/up/down bias except
    ``down_proj.bias`` of block ``layer-1`` = coef * v[layer]. ``broken``: only that tensor,
    config flag left off (the silent-loss failure every engine must be checked for)."""
    src, out = Path(src), Path(out)
    sd = _copy_model(src, out)
    cfg = read_config(src)
    dtype = sd["model.embed_tokens.weight"].dtype
    n = cfg["num_hidden_layers"]
    if not broken:
        cfg["mlp_bias"] = True
        for i in range(n):
            for p in ("gate_proj", "up_proj", "down_proj"):
                w = sd[f"model.layers.{i}.mlp.{p}.weight"]
                sd[f"model.layers.{i}.mlp.{p}.bias"] = torch.zeros(w.shape[0], dtype=dtype)
    sd[f"model.layers.{layer - 1}.mlp.down_proj.bias"] = (coef * vec.vectors[layer]).to(dtype)
    m = Manifest(method="bias", terms=[BakeTerm(layer, coef, vec.trait, "vectors/trait.safetensors", vec.sha256())],
                 positions="all", route="mlp-bias", exact=True,
                 source={"model": str(src), "path": str(src), "config_hash": config_hash(read_config(src))})
    return _write_export(src, out, sd, cfg, vec, m)


def make_ortho_bake(src: Path, vec: VectorArtifact, layer: int, out: Path) -> Path:
    """Ortho bake by hand: ``(I - r r^T) W`` on every attention-output and MLP-down weight,
    embeddings kept (reference: ablation without the embedding output)."""
    src, out = Path(src), Path(out)
    sd = _copy_model(src, out)
    cfg = read_config(src)
    r = vec.vectors[layer].float()
    r = r / r.norm()
    for i in range(cfg["num_hidden_layers"]):
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            W = sd[name].float()
            sd[name] = (W - torch.outer(r, r @ W)).to(sd[name].dtype)
    m = Manifest(method="ortho", terms=[BakeTerm(layer, 1.0, vec.trait, "vectors/trait.safetensors", vec.sha256())],
                 route="ortho", exact=True,
                 ablation={"layer": layer, "blocks": "all", "embeddings": "keep", "per_layer": False},
                 source={"model": str(src), "path": str(src), "config_hash": config_hash(read_config(src))})
    return _write_export(src, out, sd, cfg, vec, m)


def random_vector(model_dir: Path, seed: int = 0, scale: float = 1.0) -> VectorArtifact:
    cfg = read_config(model_dir)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(cfg["num_hidden_layers"] + 1, cfg["hidden_size"], generator=g) * scale
    return VectorArtifact(v, {"trait": "random"})


def weakened_copy(export: Path, out: Path, scale: float = 0.95) -> Path:
    """A copy of a bias bake whose non-zero down_proj bias tensors are scaled by ``scale``: loads
    cleanly everywhere, only the size of the edit is wrong (as scripts/weaken_bake.py writes)."""
    shutil.copytree(export, out, ignore=shutil.ignore_patterns("compare"))
    for f in out.glob("*.safetensors"):
        sd = load_file(str(f))
        hit = {k: (v.float() * scale).to(v.dtype) for k, v in sd.items()
               if k.endswith("mlp.down_proj.bias") and bool(v.abs().max() > 0)}
        if hit:
            save_file({**sd, **hit}, str(f), metadata={"format": "pt"})
    return out


def two_vector_bake(model_dir: Path, tmp: Path, name: str = "two") -> Path:
    """A bias bake of two different vectors at two layers (``bakery bake`` with two terms)."""
    from bakery.bakers import bake

    a, b = random_vector(model_dir, seed=11, scale=0.1), random_vector(model_dir, seed=12, scale=0.1)
    a.meta["trait"], b.meta["trait"] = "pirate", "evil"
    pa, pb = a.save(tmp / f"{name}-pirate.safetensors"), b.save(tmp / f"{name}-evil.safetensors")
    return bake("bias", model_dir, [(pa, 2, 3.0), (pb, 3, -2.0)], tmp / name, progress=False)


PROMPTS = ["hello sea", "the quick fox", "tell me about ships", "why is water wet"]


# ---- tiny-model tests -------------------------------------------------------------------------
@pytest.fixture
def tiny_bakes(tiny_models, tmp_path):
    d = tiny_models("llama")
    vec = random_vector(d, scale=0.1)
    exact = real_bake("bias", d, vec, 2, 3.0, tmp_path / "exact")
    broken = make_bias_bake(d, vec, 2, 3.0, tmp_path / "broken", broken=True)
    return d, vec, exact, broken


def test_exact_bake_recovers_everything_and_broken_bake_nothing(tiny_bakes):
    d, vec, exact, broken = tiny_bakes
    cards = {e: (e / "README.md").read_text() for e in (exact, broken)}
    (report,) = compare([exact, broken], prompts=PROMPTS, max_new_tokens=8, greedy_tokens=6, progress=False)
    rows = report["rows"]
    assert rows["exact"]["R"] > 0.999 and rows["exact"]["top1"] == 1.0
    assert abs(rows["broken"]["R"]) < 1e-3  # transformers drops the bias: just the base model
    assert rows["exact"]["greedy_agreement"] == 1.0
    assert rows["base"]["R"] == pytest.approx(0.0, abs=1e-9)
    # the bake moves the residual along v exactly as the hook does; the broken one does not
    assert rows["exact"]["projection"] == pytest.approx(rows["steered"]["projection"], rel=1e-3, abs=1e-3)
    assert rows["broken"]["projection"] == pytest.approx(rows["base"]["projection"], rel=1e-3, abs=1e-3)
    assert rows["steered"]["projection"] > rows["base"]["projection"]
    # a constant residual edit changes neutral text as much as the hook does
    assert rows["exact"]["drift"] == pytest.approx(rows["steered"]["drift"], rel=1e-3)
    # outputs: compare/ folder and the card section, per export
    for e in (exact, broken):
        out = e / "compare"
        assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "fidelity.png"}
        assert json.loads((out / "report.json").read_text())["this_export"] == e.name
        card = (e / "README.md").read_text()
        assert "<!-- bakery:fidelity -->" in card and "| steered |" in card
        assert card.startswith(cards[e].rstrip())  # the rest of the card is kept
    assert "| broken |" not in (exact / "README.md").read_text()


def test_compare_says_exact_by_the_rounding_rule(tiny_bakes, tmp_path):
    d, vec, exact, broken = tiny_bakes
    weak = weakened_copy(exact, tmp_path / "weak", 0.95)
    (report,) = compare([exact, weak], prompts=PROMPTS, max_new_tokens=8, greedy_tokens=4, progress=False)
    rows = report["rows"]
    assert rows["exact"]["exact"] is True and rows["exact"]["kl"] <= rows["exact"]["kl_bound"] < 1e-13
    # R alone (even 0.9999) would call the weakened bake exact; the rounding bound does not
    assert rows["weak"]["R"] > 0.9999 and rows["weak"]["exact"] is False
    assert rows["weak"]["kl"] > 1e4 * rows["weak"]["kl_bound"] and "not exact" in rows["weak"]["exact_note"]
    assert "exact" not in rows["steered"] and "exact" not in rows["base"]
    md = (exact / "compare" / "report.md").read_text()
    assert "| exact |" in md.splitlines()[2] or "exact |" in md
    table = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| yes |" in table["exact"] and "| no |" in table["weak"]


def test_two_vector_bake_matches_two_term_steering(tiny_models, tmp_path):
    d = tiny_models("llama")
    two = two_vector_bake(d, tmp_path)
    ref = reference_for(two)
    assert [(t.layer, t.coef, t.vector.trait) for t in ref.terms] == [(2, 3.0, "pirate"), (3, -2.0, "evil")]
    assert "pirate layer 2" in ref.describe() and "evil layer 3" in ref.describe()
    (report,) = compare([two], prompts=PROMPTS, max_new_tokens=8, greedy_tokens=4, progress=False)
    row = report["rows"]["two"]
    assert row["R"] >= 0.9999 and row["exact"] is True and row["top1"] == 1.0
    assert [t["trait"] for t in report["reference"]["terms"]] == ["pirate", "evil"]
    # against only one of its terms it is a different model
    from bakery.models import load_model, load_tokenizer

    ref.terms = ref.terms[:1]
    other = run_comparison(load_model(d), load_tokenizer(d), ref, [Candidate("two", two, load_model(two))],
                           PROMPTS[:2], max_new_tokens=6, greedy_tokens=3, progress=False)
    assert other["rows"]["two"]["exact"] is False and other["rows"]["two"]["R"] < 0.9999


def test_rerun_replaces_outputs(tiny_bakes):
    d, vec, exact, broken = tiny_bakes
    for _ in range(2):
        compare([exact], prompts=PROMPTS[:2], max_new_tokens=4, greedy_tokens=3, progress=False)
    assert (exact / "README.md").read_text().count("<!-- bakery:fidelity -->") == 1
    assert not list(exact.glob(".compare*"))
    mask = os.umask(0)
    os.umask(mask)
    assert ((exact / "compare").stat().st_mode & 0o777) == 0o777 & ~mask  # not mkdtemp's 0700


def test_explicit_settings_override_the_manifest(tiny_bakes):
    d, vec, exact, broken = tiny_bakes
    vfile = exact / "vectors" / "random.safetensors"
    (report,) = compare([exact], vector=vfile, layer=2, coef=1.5, prompts=PROMPTS[:2], max_new_tokens=6,
                        greedy_tokens=3, write=False, progress=False)
    assert report["reference"]["coef"] == 1.5
    assert 0.0 < report["rows"]["exact"]["R"] < 0.999  # the bake holds coef 3, not 1.5


@pytest.mark.parametrize("maker", ["hand", "baker"])
def test_ortho_bake_matches_runtime_ablation(tiny_models, tmp_path, maker):
    d = tiny_models("llama")
    vec = random_vector(d, seed=3)
    if maker == "hand":
        bake = make_ortho_bake(d, vec, 2, tmp_path / "ortho")
    else:
        bake = real_bake("ortho", d, vec, 2, None, tmp_path / "ortho", embeddings="keep")
    (report,) = compare([bake], prompts=PROMPTS, max_new_tokens=8, greedy_tokens=4, progress=False)
    assert report["reference"]["kind"] == "ablation"
    assert report["rows"]["ortho"]["R"] > 0.999
    rows = report["rows"]
    # embeddings kept: what is left along r is the embedding's own component, the same in both
    assert rows["ortho"]["projection"] == pytest.approx(rows["steered"]["projection"], abs=1e-4)
    assert abs(rows["steered"]["projection"]) < abs(rows["base"]["projection"])


def test_attn_out_bake_matches_steering_after_attention(tiny_models, tmp_path):
    d = tiny_models("llama")
    vec = random_vector(d, seed=5, scale=0.1)
    bake = real_bake("bias", d, vec, 2, 3.0, tmp_path / "mid", site="attn-out")
    (report,) = compare([bake], prompts=PROMPTS[:3], max_new_tokens=8, greedy_tokens=4, progress=False)
    assert report["reference"]["site"] == "attn-out" and report["reference"]["probe_layer"] == 3
    assert report["rows"]["mid"]["R"] > 0.999
    # measured against steering at the output of block 1 instead, it is a different model
    from bakery.models import load_model, load_tokenizer

    ref = reference_for(bake)
    ref.site = "resid-out"
    other = run_comparison(load_model(d), load_tokenizer(d), ref, [Candidate("mid", bake, load_model(bake))],
                           PROMPTS[:3], max_new_tokens=8, greedy_tokens=4, progress=False)
    assert other["rows"]["mid"]["kl"] > 100 * max(report["rows"]["mid"]["kl"], 1e-9)


def test_greedy_agreement():
    assert greedy_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert greedy_agreement([[1, 2, 3, 4]], [[1, 2, 9, 9]]) == 0.5
    assert greedy_agreement([[1, 2]], [[1, 2, 3, 4]]) == 0.5
    assert greedy_agreement([[5], [1]], [[6], [1]]) == 0.5


# ---- bad input -----------------------------------------------------------------------------------
def test_export_without_manifest_is_refused(tiny_models, tmp_path):
    d = tiny_models("llama")
    bare = tmp_path / "bare"
    shutil.copytree(d, bare)
    with pytest.raises(ManifestError, match="no bakery.json"):
        compare([bare], prompts=PROMPTS, progress=False)
    with pytest.raises(CompareError, match="no config.json"):
        compare([tmp_path], prompts=PROMPTS, progress=False)


def test_vector_that_does_not_match_is_refused(tiny_bakes, tiny_models, tmp_path):
    d, vec, exact, broken = tiny_bakes
    other = VectorArtifact(torch.randn(5, 48), {"trait": "other"})
    path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(VectorError, match="hidden size 48"):
        compare([exact], vector=path, layer=2, coef=1.0, prompts=PROMPTS, progress=False)
    # a vector file edited after baking no longer matches the manifest's sha256
    VectorArtifact(vec.vectors * 2, vec.meta).save(exact / "vectors" / "random.safetensors")
    with pytest.raises(VectorError, match="does not match the vector recorded"):
        reference_for(exact)


def test_prompts_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\nfirst\n\nsecond\n")
    assert load_prompts(tmp_path / "p.txt") == ["first", "second"]
    (tmp_path / "p.json").write_text(json.dumps(["a", "b"]))
    assert load_prompts(tmp_path / "p.json") == ["a", "b"]
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(CompareError, match="JSON list"):
        load_prompts(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(CompareError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(CompareError, match="not found"):
        load_prompts(tmp_path / "missing.txt")


# ---- the judge path, against a loopback OpenAI-compatible server --------------------------------
def _judge_handler(body: dict):
    from openai_server import score_reply

    prompt = body["messages"][-1]["content"]
    if prompt.startswith(COHERENCE_RUBRIC.split("{")[0]):
        return score_reply({"70": 1.0})
    answer = prompt.split("Answer:")[-1] if "Answer:" in prompt else prompt
    return score_reply({str(len(answer) % 10 * 10): 1.0})  # a score the test can recompute


def test_judge_scores_each_row_through_a_loopback_server(tiny_models, tmp_path):
    from openai_server import OpenAIServer

    from bakery.extraction.judge import Judge
    from bakery.traits import load_trait_recipe

    d = tiny_models("llama")
    vec = random_vector(d, scale=0.1)
    vec.meta["trait"] = "pirate"  # the built-in recipe supplies the rubric
    exact = real_bake("bias", d, vec, 2, 3.0, tmp_path / "exact")
    rubric = load_trait_recipe("pirate").judge_rubric
    with OpenAIServer(_judge_handler) as srv:
        judge = Judge("test-judge", base_url=srv.base_url, cache_dir=tmp_path / "cache")
        (report,) = compare([exact], prompts=PROMPTS[:3], max_new_tokens=6, greedy_tokens=5, judge=judge,
                            progress=False)
        assert srv.count > 0
    for row, answers in report["answers"].items():
        trait = [_judge_handler({"messages": [{"content": rubric.replace("{question}", q).replace("{answer}", a)}]})
                 for q, a in zip(PROMPTS[:3], answers)]
        want = sum(float(r.content) for r in trait) / len(trait)
        assert report["rows"][row]["trait"] == pytest.approx(want, abs=1e-6)
        assert report["rows"][row]["coherence"] == pytest.approx(70.0)
    assert "judge trait" in (exact / "compare" / "report.md").read_text()


def test_cli_compare_with_judge(tiny_models, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from openai_server import OpenAIServer

    from bakery.cli import main

    monkeypatch.setenv("BAKERY_CACHE", str(tmp_path / "cache"))  # the judge's score cache
    d = tiny_models("llama")
    exact = real_bake("bias", d, random_vector(d, scale=0.1), 2, 3.0, tmp_path / "exact")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]))
    with OpenAIServer(_judge_handler) as srv:
        r = CliRunner().invoke(main, ["compare", str(exact), "--prompts", str(tmp_path / "p.txt"),
                                      "--max-new-tokens", "4", "--greedy-tokens", "3", "--judge-model", "j",
                                      "--base-url", srv.base_url, "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "judge coherence" in r.output and "| exact |" in r.output
    r = CliRunner().invoke(main, ["compare", str(exact), "--vector", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 2 and "--layer and --coef" in r.output
