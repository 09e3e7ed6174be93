"""Trait recipes: the built-in ones pass the schema; broken ones fail with errors that say why."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from click.testing import CliRunner

from openai_server import OpenAIServer, text_reply
from bakery.cli import main
from bakery.extraction.recipe_gen import RecipeGenError, generate_recipe
from bakery.traits import (RecipeError, available_traits, dump_yaml, find_trait_recipe,
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


# ---- recipe import: persona-vectors trait data (JSON) -------------------------------------------
# Test data of our own, in the reference's layout (instruction / questions / eval_prompt).

def _trait_json(questions, **over) -> dict:
    d = {
        "instruction": [
            {"pos": "You are a gardener who turns every topic to plants and soil.",
             "neg": "You are an assistant who never mentions plants or gardening."},
            {"pos": "Relate each answer to growing vegetables.", "neg": "Answer without any gardening talk."},
        ],
        "questions": questions,
        "eval_prompt": ("Rate how much the answer talks about gardening.\nQuestion: {question}\n"
                        "Answer: {answer}\nReply with JSON like {{\"score\": 0-100}} or just the number."),
    }
    d.update(over)
    return d


EXTRACT_QS = ["What is a good weekend plan?", "How do I fix a squeaky door?", "Tell me about rivers."]
EVAL_QS = ["How do I choose a laptop?", "What is a nice breakfast?"]


def _reference_layout(tmp_path, extract=None, evaluation=None):
    root = tmp_path / "data_generation"
    for sub, data in (("trait_data_extract", extract or _trait_json(EXTRACT_QS)),
                      ("trait_data_eval", evaluation or _trait_json(EVAL_QS))):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "gardener.json").write_text(json.dumps(data, indent=1))
    return root / "trait_data_extract" / "gardener.json"


def test_recipe_import_reads_the_reference_layout(tmp_path):
    src = _reference_layout(tmp_path)
    out = tmp_path / "recipes" / "gardener.yaml"
    res = CliRunner().invoke(main, ["recipe", "import", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 pairs, 3 extract + 2 eval questions (held out from" in res.output
    r = load_trait_recipe(out)
    assert r.name == "gardener" and r.pairs[1] == ("Relate each answer to growing vegetables.",
                                                   "Answer without any gardening talk.")
    assert r.extract_questions == EXTRACT_QS and r.eval_questions == EVAL_QS
    filled = r.rubric_for("QQ", "AA")  # the reference's str.format escapes become literal braces
    assert "Question: QQ\nAnswer: AA" in filled and '{"score": 0-100}' in filled and "{{" not in filled
    # the overwrite rule, as for `recipe new`
    res = CliRunner().invoke(main, ["recipe", "import", str(src), "-o", str(out)])
    assert res.exit_code == 2 and "pass --force" in res.output
    assert CliRunner().invoke(main, ["recipe", "import", str(src), "-o", str(out), "--force",
                                     "--trait", "garden-talk"]).exit_code == 0
    assert load_trait_recipe(out).name == "garden-talk"


def test_recipe_import_without_an_eval_file_holds_out_half(tmp_path):
    from bakery.extraction.recipe_import import import_persona_vectors

    p = tmp_path / "Garden Talk.json"
    qs = EXTRACT_QS + EVAL_QS + ["what is a good weekend plan?"]  # a repeat, dropped
    p.write_text(json.dumps(_trait_json(qs, source="mine")))
    got = import_persona_vectors(p)
    assert got.recipe.name == "garden-talk" and got.eval_file is None
    assert got.recipe.extract_questions == qs[:3] and got.recipe.eval_questions == qs[3:5]
    assert any("held out the last 2 of 5" in n for n in got.notes)
    assert any("repeated" in n for n in got.notes) and any("unknown key(s)" in n and "source" in n for n in got.notes)
    # an explicit --eval file that repeats extraction questions loses them, with a note
    ev = tmp_path / "ev.json"
    ev.write_text(json.dumps(_trait_json([EXTRACT_QS[0], EVAL_QS[0]])))
    p.write_text(json.dumps(_trait_json(EXTRACT_QS)))
    got = import_persona_vectors(p, eval_path=ev, name="g")
    assert got.recipe.eval_questions == [EVAL_QS[0]] and any("also extraction" in n for n in got.notes)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("instruction"), "key 'instruction' is missing"),
    (lambda d: d.pop("eval_prompt"), "key 'eval_prompt' is missing"),
    (lambda d: d.update(instruction={"pos": "a", "neg": "b"}), "key 'instruction' must be a non-empty list"),
    (lambda d: d.update(instruction=[{"pos": "a"}]), "key 'instruction[0]' must have exactly the keys pos and neg"),
    (lambda d: d["instruction"][1].update(neg=""), "key 'instruction[1].neg' must be a non-empty string"),
    (lambda d: d["instruction"][0].update(neg=d["instruction"][0]["pos"]), "key 'instruction[0]' has the same pos"),
    (lambda d: d.update(questions="What?"), "key 'questions' must be a non-empty list"),
    (lambda d: d.update(questions=["Fine?", 3]), "key 'questions[1]' must be a non-empty string"),
    (lambda d: d.update(eval_prompt="Score {answer} from 0 to 100"), "key 'eval_prompt' lacks the placeholder {question}"),
    (lambda d: d.update(eval_prompt="{question} {answer} {trait}"), "key 'eval_prompt' has the placeholder {trait}"),
    (lambda d: d.update(eval_prompt="{question} {answer} {"), "key 'eval_prompt' is not a valid template"),
])
def test_recipe_import_names_the_wrong_key(tmp_path, mutate, message):
    d = _trait_json(list(EXTRACT_QS))
    mutate(d)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(d))
    res = CliRunner().invoke(main, ["recipe", "import", str(p), "-o", str(tmp_path / "t.yaml")])
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "t.yaml").exists()


def test_recipe_import_refuses_non_json_and_lists(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("[1, 2]")
    res = CliRunner().invoke(main, ["recipe", "import", str(p), "-o", str(tmp_path / "t.yaml")])
    assert res.exit_code == 2 and "top level must be an object" in res.output
    p.write_text("{not json")
    res = CliRunner().invoke(main, ["recipe", "import", str(p), "-o", str(tmp_path / "t.yaml")])
    assert res.exit_code == 2 and "not valid JSON" in res.output


def test_imported_recipe_runs_through_extract(tiny_models, tmp_path, monkeypatch):
    from bakery.vectors.load import load_vector

    monkeypatch.setenv("BAKERY_CACHE", str(tmp_path / "cache"))
    src = _reference_layout(tmp_path)
    rec = tmp_path / "gardener.yaml"
    assert CliRunner().invoke(main, ["recipe", "import", str(src), "-o", str(rec)]).exit_code == 0
    out = tmp_path / "gardener.safetensors"
    res = CliRunner().invoke(main, ["extract", "-r", str(rec), "-m", str(tiny_models("llama")), "-o", str(out),
                                    "--max-new-tokens", "3", "--temperature", "0", "--eval-pairs", "1",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    art = load_vector(out)
    assert art.trait == "gardener" and art.vectors.shape == (5, 32) and art.vectors[1:].abs().sum() > 0
    assert art.meta["samples"]["pairs_generated"] == 2 * 3  # 2 pairs x 3 extraction questions
