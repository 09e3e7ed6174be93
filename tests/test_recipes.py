"""Trait recipes: the built-in ones pass the schema; broken ones fail with errors that say why."""

from __future__ import annotations

import copy

import pytest
import yaml
from click.testing import CliRunner

from openai_server import OpenAIServer, text_reply
from bakery.cli import main
from bakery.extraction.recipe_gen import RecipeGenError, generate_recipe
from bakery.extraction.recipes import (RecipeError, available_traits, dump_yaml, find_trait_recipe,
                            from_dict, load_trait_recipe, validate)


def _good() -> dict:
    return {
        "name": "calm", "description": "Calm and measured.",
        "pairs": [{"pos": "Be calm.", "neg": "Be frantic."}, {"pos": "Stay serene.", "neg": "Panic."}],
        "extract_questions": ["How do I cook rice?", "What is rain?"],
        "eval_questions": ["How do I bake bread?", "What is snow?"],
        "judge_rubric": "Q: {question}\nA: {answer}\nHow calm, 0-100?",
    }


@pytest.mark.parametrize("name", ["pirate", "evil", "sycophantic", "hallucinating"])
def test_builtin_recipes_are_complete(name):
    r = load_trait_recipe(name)
    assert r.name == name and r.description
    assert len(r.pairs) == 5 and len(r.extract_questions) == 20 and len(r.eval_questions) == 20
    assert not {q.lower() for q in r.extract_questions} & {q.lower() for q in r.eval_questions}
    filled = r.rubric_for("QQ", "AA")
    assert "QQ" in filled and "AA" in filled and "{" not in filled
    assert find_trait_recipe(name).stem == name


def test_at_least_four_builtin_traits():
    assert {"pirate", "evil", "sycophantic", "hallucinating"} <= set(available_traits())


def test_missing_field_is_named(tmp_path):
    d = _good()
    del d["eval_questions"]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(RecipeError, match="missing field.*eval_questions"):
        load_trait_recipe(p)


def test_overlapping_question_sets_are_refused():
    d = _good()
    d["eval_questions"] = ["how do I cook  RICE?", "What is snow?"]  # same after normalising
    errs = validate(d)
    assert any("disjoint" in e and "cook" in e for e in errs)
    with pytest.raises(RecipeError, match="disjoint"):
        from_dict(d)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(judge_rubric="Score {answer} 0-100"), "placeholder {question}"),
    (lambda d: d.update(pairs=[{"pos": "x"}]), "exactly the keys pos and neg"),
    (lambda d: d.update(pairs=[{"pos": "Same", "neg": "same"}]), "no contrast"),
    (lambda d: d.update(pairs=[]), "at least 1"),
    (lambda d: d.update(name="Bad Name"), "lowercase"),
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d.update(extract_questions=["a", "a"]), "repeats"),
    (lambda d: d.update(description=""), "'description' must be a non-empty string"),
])
def test_schema_errors(mutate, message):
    d = copy.deepcopy(_good())
    mutate(d)
    errs = validate(d)
    assert any(message in e for e in errs), errs


def test_unknown_name_lists_available():
    with pytest.raises(RecipeError, match="available:.*pirate"):
        load_trait_recipe("no-such-trait")


def test_not_yaml_mapping(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_trait_recipe(p)


def test_dump_roundtrip(tmp_path):
    r = from_dict(_good())
    p = tmp_path / "calm.yaml"
    p.write_text(dump_yaml(r))
    assert load_trait_recipe(p).to_dict() == r.to_dict()


def test_cli_check_reports_errors(tmp_path):
    d = _good()
    d["eval_questions"] = d["extract_questions"]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(main, ["recipe", "check", str(p)])
    assert res.exit_code == 2 and "disjoint" in res.output


# ---- recipe new, against the loopback server -------------------------------------------------

def _generated(n_q: int = 20) -> str:
    import json

    return json.dumps({
        "description": "Speaks like a cowboy.",
        "pairs": [{"pos": f"Talk like a cowboy, style {i}.", "neg": f"Talk plainly, style {i}."} for i in range(5)],
        "extract_questions": [f"Extract question number {i}?" for i in range(n_q)],
        "eval_questions": [f"Eval question number {i}?" for i in range(20)],
        "judge_rubric": "Q: {question}\nA: {answer}\nHow cowboy is it, 0-100? Number only.",
    })


def test_recipe_new_retries_malformed_answers(tmp_path):
    with OpenAIServer() as srv:
        srv.queue(text_reply("Sure! Here is a recipe: {oops"), text_reply(_generated(n_q=12)),
                  text_reply("```json\n" + _generated() + "\n```"))
        out = tmp_path / "cowboy.yaml"
        res = CliRunner().invoke(main, ["recipe", "new", "--trait", "cowboy", "--description", "a cowboy",
                                        "-o", str(out), "--judge-model", "gen", "--base-url", srv.base_url],
                                 env={"OPENAI_API_KEY": "sk-secret"})
        assert res.exit_code == 0, res.output
        assert srv.count == 3
        # the second request carried the problems of the first answer back to the model
        assert "not parseable JSON" in srv.requests[1]["messages"][-1]["content"]
        assert "exactly 20" in srv.requests[2]["messages"][-1]["content"]
    r = load_trait_recipe(out)
    assert r.name == "cowboy" and len(r.extract_questions) == 20
    assert "sk-secret" not in out.read_text()


def test_recipe_new_gives_up(tmp_path):
    with OpenAIServer(lambda b: text_reply("no json here")) as srv:
        with pytest.raises(RecipeGenError, match="no valid recipe after 2 attempts"):
            generate_recipe("cowboy", "x", model="gen", base_url=srv.base_url, api_key="k", retries=1)
        assert srv.count == 2
