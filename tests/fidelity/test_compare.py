"""bakery compare: the fidelity harness against runtime steering and ablation."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from bakery.extraction.judge import COHERENCE_RUBRIC
from bakery.fidelity.compare import Candidate, compare, run_comparison
from bakery.fidelity.probes import greedy_agreement
from bakery.fidelity.prompts import load_prompts
from bakery.fidelity.reference import CompareError, reference_for
from bakery.io.manifest import ManifestError
from bakery.vectors.artifact import VectorArtifact, VectorError
from helpers import TINY_PROMPTS, make_bias_bake, make_ortho_bake, random_vector, real_bake, two_vector_bake, weakened_copy


# ---- hand-made bakes: the broken one no baker writes, and checks independent of the bakers -------


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
    (report,) = compare([exact, broken], prompts=TINY_PROMPTS, max_new_tokens=8, greedy_tokens=6, progress=False)
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
    (report,) = compare([exact, weak], prompts=TINY_PROMPTS, max_new_tokens=8, greedy_tokens=4, progress=False)
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
    (report,) = compare([two], prompts=TINY_PROMPTS, max_new_tokens=8, greedy_tokens=4, progress=False)
    row = report["rows"]["two"]
    assert row["R"] >= 0.9999 and row["exact"] is True and row["top1"] == 1.0
    assert [t["trait"] for t in report["reference"]["terms"]] == ["pirate", "evil"]
    # against only one of its terms it is a different model
    from bakery.models import load_model, load_tokenizer

    ref.terms = ref.terms[:1]
    other = run_comparison(load_model(d), load_tokenizer(d), ref, [Candidate("two", two, load_model(two))],
                           TINY_PROMPTS[:2], max_new_tokens=6, greedy_tokens=3, progress=False)
    assert other["rows"]["two"]["exact"] is False and other["rows"]["two"]["R"] < 0.9999


def test_rerun_replaces_outputs(tiny_bakes):
    d, vec, exact, broken = tiny_bakes
    for _ in range(2):
        compare([exact], prompts=TINY_PROMPTS[:2], max_new_tokens=4, greedy_tokens=3, progress=False)
    assert (exact / "README.md").read_text().count("<!-- bakery:fidelity -->") == 1
    assert not list(exact.glob(".compare*"))
    mask = os.umask(0)
    os.umask(mask)
    assert ((exact / "compare").stat().st_mode & 0o777) == 0o777 & ~mask  # not mkdtemp's 0700


def test_explicit_settings_override_the_manifest(tiny_bakes):
    d, vec, exact, broken = tiny_bakes
    vfile = exact / "vectors" / "random.safetensors"
    (report,) = compare([exact], vector=vfile, layer=2, coef=1.5, prompts=TINY_PROMPTS[:2], max_new_tokens=6,
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
    (report,) = compare([bake], prompts=TINY_PROMPTS, max_new_tokens=8, greedy_tokens=4, progress=False)
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
    (report,) = compare([bake], prompts=TINY_PROMPTS[:3], max_new_tokens=8, greedy_tokens=4, progress=False)
    assert report["reference"]["site"] == "attn-out" and report["reference"]["probe_layer"] == 3
    assert report["rows"]["mid"]["R"] > 0.999
    # measured against steering at the output of block 1 instead, it is a different model
    from bakery.models import load_model, load_tokenizer

    ref = reference_for(bake)
    ref.site = "resid-out"
    other = run_comparison(load_model(d), load_tokenizer(d), ref, [Candidate("mid", bake, load_model(bake))],
                           TINY_PROMPTS[:3], max_new_tokens=8, greedy_tokens=4, progress=False)
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
        compare([bare], prompts=TINY_PROMPTS, progress=False)
    with pytest.raises(CompareError, match="no config.json"):
        compare([tmp_path], prompts=TINY_PROMPTS, progress=False)


def test_vector_that_does_not_match_is_refused(tiny_bakes, tiny_models, tmp_path):
    d, vec, exact, broken = tiny_bakes
    other = VectorArtifact(torch.randn(5, 48), {"trait": "other"})
    path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(VectorError, match="hidden size 48"):
        compare([exact], vector=path, layer=2, coef=1.0, prompts=TINY_PROMPTS, progress=False)
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
        (report,) = compare([exact], prompts=TINY_PROMPTS[:3], max_new_tokens=6, greedy_tokens=5, judge=judge,
                            progress=False)
        assert srv.count > 0
    for row, answers in report["answers"].items():
        trait = [_judge_handler({"messages": [{"content": rubric.replace("{question}", q).replace("{answer}", a)}]})
                 for q, a in zip(TINY_PROMPTS[:3], answers)]
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
    (tmp_path / "p.txt").write_text("\n".join(TINY_PROMPTS[:2]))
    with OpenAIServer(_judge_handler) as srv:
        r = CliRunner().invoke(main, ["compare", str(exact), "--prompts", str(tmp_path / "p.txt"),
                                      "--max-new-tokens", "4", "--greedy-tokens", "3", "--judge-model", "j",
                                      "--base-url", srv.base_url, "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "judge coherence" in r.output and "| exact |" in r.output
    r = CliRunner().invoke(main, ["compare", str(exact), "--vector", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 2 and "--layer and --coef" in r.output
