"""Extraction on tiny random models (fast) and the pirate recipe on the embedded model (slow)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

from openai_server import OpenAIServer, score_reply
from bakery.extraction.judge import COHERENCE_RUBRIC
from bakery.extraction import diagnostics
from bakery.cli import main
from bakery.extraction.cache import cached_vector, list_cached, resolve_trait, sibling_paths
from bakery.extraction.capture import capture
from bakery.extraction.extract import ExtractError, ExtractSettings, extract
from bakery.steering.generation import NoChatTemplate, render_chat
from bakery.extraction.judge import Judge, JudgeError
from bakery.models import load_model, load_tokenizer
from bakery.vectors.artifact import VARIANTS
from bakery.vectors.load import load_vector

FAST = dict(max_new_tokens=6, temperature=0.0, batch_size=8, eval_pairs=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BAKERY_CACHE", str(tmp_path / "cache"))


def _recipe(tmp_path, name="calm"):
    d = {
        "name": name, "description": "Calm and measured.",
        "pairs": [{"pos": "You are calm.", "neg": "You are angry."},
                  {"pos": "Stay serene.", "neg": "Shout a lot."}],
        "extract_questions": ["Tell me about the sea.", "What is the capital of France?", "Cook rice?"],
        "eval_questions": ["Tell me about ships.", "The quick brown fox?"],
        "judge_rubric": "Q: {question}\nA: {answer}\nHow calm, 0-100?",
    }
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _manual_means(model, tok, prompt: str, response_ids: list[int]):
    """Independent reference: one forward pass over prompt + response, averaged by hand."""
    p = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    full = torch.cat([p, torch.tensor(response_ids, dtype=p.dtype)])[None]
    with torch.no_grad():
        hs = model(input_ids=full, output_hidden_states=True).hidden_states
    n = p.numel()
    return (torch.stack([h[0, n:].mean(0) for h in hs]), torch.stack([h[0, :n].mean(0) for h in hs]),
            torch.stack([h[0, n - 1] for h in hs]))


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
def test_single_pass_capture_matches_a_separate_forward(tiny_models, model_type):
    d = tiny_models(model_type)
    m, tok = load_model(d), load_tokenizer(d)
    prompts = [render_chat(tok, q, s) for q, s in [("hello sea", "be calm"), ("the quick brown fox jumps", None),
                                                   ("ships", "shout")]]
    single = capture(m, tok, prompts, max_new_tokens=7, temperature=0.0, batch_size=3)
    two = capture(m, tok, prompts, max_new_tokens=7, temperature=0.0, batch_size=3, mode="two-pass")
    assert single.texts == two.texts and single.response_tokens == two.response_tokens
    assert single.response_avg.shape == (3, m.config.num_hidden_layers + 1, tok_hidden(m))
    for v in VARIANTS:
        torch.testing.assert_close(single.variant(v), two.variant(v), atol=1e-4, rtol=1e-4)
    # and against a hand-made forward pass of one unpadded example
    gen = m.generate(**tok(prompts[1:2], return_tensors="pt", add_special_tokens=False),
                     max_new_tokens=7, do_sample=False, pad_token_id=tok.pad_token_id)
    resp = gen[0, len(tok(prompts[1], add_special_tokens=False)["input_ids"]):].tolist()
    eos = m.generation_config.eos_token_id
    resp = resp[: resp.index(eos)] if eos in resp else resp
    ra, pa, pl = _manual_means(m, tok, prompts[1], resp)
    torch.testing.assert_close(single.response_avg[1], ra, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single.prompt_avg[1], pa, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single.prompt_last[1], pl, atol=1e-4, rtol=1e-4)


def tok_hidden(m) -> int:
    return m.config.hidden_size if hasattr(m.config, "hidden_size") else m.config.n_embd


def test_extract_writes_three_variants_metadata_and_cache(tiny_models, tmp_path):
    d = tiny_models("llama")
    out = tmp_path / "vec" / "calm.safetensors"
    art = extract(_recipe(tmp_path), d, out=out, settings=ExtractSettings(**FAST), progress=False)
    files = sibling_paths(out)
    assert all(p.is_file() for p in files.values()), files
    assert files["prompt_avg"].name == "calm.prompt_avg.safetensors"
    m = art.meta
    assert art.vectors.shape == (5, 32)
    assert m["variant"] == "response_avg" and m["trait"] == "calm"
    assert m["model_config_hash"] and m["model"]
    assert m["samples"]["pairs_generated"] == 2 * 3 and m["samples"]["eval_pos"] == 2
    assert m["settings"]["max_new_tokens"] == 6
    assert [s["layer"] for s in m["layers"]] == list(range(5))
    assert all(0.0 <= s["auc"] <= 1.0 for s in m["layers"])
    assert 1 <= m["recommended_layer"] <= 3 and m["recommended_layer"] == diagnostics.recommend_layer(m["layers"])
    for v in ("prompt_avg", "prompt_last"):
        other = load_vector(files[v])
        assert other.meta["variant"] == v and not torch.equal(other.vectors, art.vectors)
    rows = [json.loads(x) for x in files["responses"].read_text().splitlines()]
    assert len(rows) == 12 + 4 and {r["split"] for r in rows} == {"extract", "eval"}
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    # the cache: found by trait name, and reused without generating again
    assert cached_vector("calm", d) is not None and list_cached(d)[0][0] == "calm"
    assert resolve_trait("calm", d) == cached_vector("calm", d)
    import bakery.extraction.extract as ex

    def boom(*a, **k):
        raise AssertionError("generated again despite a cache entry")

    orig = ex.capture
    ex.capture = boom
    try:
        again = extract(_recipe(tmp_path), d, out=tmp_path / "again.safetensors",
                        settings=ExtractSettings(**FAST), progress=False)
    finally:
        ex.capture = orig
    assert torch.equal(again.vectors, art.vectors)


def test_vector_is_difference_of_example_means(tiny_models, tmp_path):
    d = tiny_models("qwen2")
    art = extract(_recipe(tmp_path), d, settings=ExtractSettings(**FAST), progress=False)
    m, tok = load_model(d), load_tokenizer(d)
    rows = [json.loads(x) for x in (cached_vector("calm", d).parent / "vector.responses.jsonl").read_text().splitlines()]
    ext = [r for r in rows if r["split"] == "extract"]
    prompts = [render_chat(tok, r["question"], r["system"]) for r in ext]
    two = capture(m, tok, prompts, max_new_tokens=6, temperature=0.0, batch_size=1, mode="two-pass")
    assert two.texts == [r["answer"] for r in ext]
    pos = torch.tensor([r["polarity"] == "pos" for r in ext])
    ref = two.response_avg[pos].mean(0) - two.response_avg[~pos].mean(0)
    torch.testing.assert_close(art.vectors, ref, atol=1e-4, rtol=1e-3)


def test_template_without_system_role_is_folded(tiny_models, tmp_path):
    src = tiny_models("llama")
    d = tmp_path / "nosys"
    shutil.copytree(src, d)
    tok = load_tokenizer(d)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(d)
    art = extract(_recipe(tmp_path), d, settings=ExtractSettings(**FAST), progress=False)
    assert art.vectors.abs().sum() > 0
    assert "You are calm.\n\nTell me" in render_chat(load_tokenizer(d), "Tell me", "You are calm.")


def test_model_without_chat_template_is_refused(tiny_models, tmp_path):
    src = tiny_models("llama")
    d = tmp_path / "notemplate"
    shutil.copytree(src, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in d.glob("chat_template.*"):
        f.unlink()
    out = tmp_path / "x.safetensors"
    with pytest.raises(NoChatTemplate, match="no chat template"):
        extract(_recipe(tmp_path), d, out=out, settings=ExtractSettings(**FAST), progress=False)
    assert not out.exists() and cached_vector("calm", d) is None


def test_unreachable_judge_writes_nothing(tiny_models, tmp_path):
    d = tiny_models("llama")
    with OpenAIServer() as srv:
        url = srv.base_url  # closed when the block ends: nothing listens there any more
    judge = Judge("j", base_url=url, api_key="k", cache_dir=tmp_path / "jc", max_retries=1, backoff=0.01)
    out = tmp_path / "v.safetensors"
    with pytest.raises(JudgeError, match="reachable"):
        extract(_recipe(tmp_path), d, out=out, judge=judge,
                settings=ExtractSettings(**FAST, judge_model="j"), progress=False)
    assert not out.exists() and list_cached(d) == []
    res = CliRunner().invoke(main, ["extract", "-r", str(_recipe(tmp_path)), "-m", str(d), "-o", str(out),
                                    "--judge-model", "j", "--base-url", url, "--max-new-tokens", "4"],
                             env={"OPENAI_API_KEY": "sk-never-shown"})
    assert res.exit_code == 2 and "reachable" in res.output and "sk-never-shown" not in res.output
    assert not out.exists()


def test_judge_filter_keeps_scored_pairs_and_stops_when_too_few(tiny_models, tmp_path):
    d = tiny_models("llama")
    rp = _recipe(tmp_path)
    plain = extract(rp, d, settings=ExtractSettings(**FAST), progress=False)
    rows = [json.loads(x) for x in (cached_vector("calm", d).parent / "vector.responses.jsonl").read_text().splitlines()]
    ext = [r for r in rows if r["split"] == "extract"]
    pos_answers = {r["answer"] for r in ext if r["polarity"] == "pos"}
    neg_answers = {r["answer"] for r in ext if r["polarity"] == "neg"}
    # the judge calls an answer "calm" when only pos prompts produced it; pairs need a calm pos
    # and a non-calm neg, so the expected survivors follow from the answers alone
    calm = pos_answers - neg_answers
    expected = sum(1 for a, b in zip(ext[::2], ext[1::2]) if a["answer"] in calm and b["answer"] not in calm)
    assert 1 <= expected < 6  # both outcomes occur, so the filter has something to decide

    def handler(body):
        text = body["messages"][0]["content"]
        if text.startswith(COHERENCE_RUBRIC.split("{")[0]) or "\nA: " not in text:  # coherence, or the reachability ping
            return score_reply({"80": 1.0})
        answer = text.split("\nA: ", 1)[1].rsplit("\nHow calm", 1)[0]
        return score_reply({"90": 1.0} if answer in calm else {"10": 1.0})

    with OpenAIServer(handler) as srv:
        judge = Judge("j", base_url=srv.base_url, api_key="k", cache_dir=tmp_path / "jc")
        art = extract(rp, d, judge=judge, progress=False,
                      settings=ExtractSettings(**FAST, judge_model="j", min_pairs=1))
        assert art.meta["samples"]["pairs_kept"] == expected
        assert not torch.equal(art.vectors, plain.vectors)
        rows = [json.loads(x) for x in (cached_vector("calm", d).parent / "vector.responses.jsonl")
                .read_text().splitlines()]
        kept = [r for r in rows if r.get("kept")]
        assert len(kept) == 2 * expected and all(r["coherence"] == pytest.approx(80) for r in kept)
        with pytest.raises(ExtractError, match=f"only {expected} pos/neg pair"):
            extract(rp, d, judge=judge, progress=False, use_cache=False,
                    settings=ExtractSettings(**FAST, judge_model="j", min_pairs=expected + 1))


def test_auc_and_recommendation():
    assert diagnostics.auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert diagnostics.auc([0, 1], [2, 3]) == 0.0
    assert diagnostics.auc([1, 2], [1, 2]) == 0.5
    assert diagnostics.auc([2, 3], [1, 2]) == pytest.approx(0.875)  # one tie counts half
    stats = [{"layer": i, "auc": a, "effect_size": e} for i, (a, e) in
             enumerate([(1.0, 9), (0.8, 1), (0.995, 2), (1.0, 3), (0.9, 1), (1.0, 99)])]
    assert diagnostics.recommend_layer(stats) == 3  # rows 0 and 5 (post-norm) are never chosen


def test_cli_extract_prints_table_and_steer_accepts_result(tiny_models, tmp_path):
    d = tiny_models("llama")
    out = tmp_path / "calm.safetensors"
    res = CliRunner().invoke(main, ["extract", "-r", str(_recipe(tmp_path)), "-m", str(d), "-o", str(out),
                                    "--max-new-tokens", "5", "--temperature", "0", "--eval-pairs", "1"])
    assert res.exit_code == 0, res.output
    assert "recommended: layer" in res.output and "AUC" in res.output and out.is_file()
    res = CliRunner().invoke(main, ["extract", "--list", "-m", str(d)])
    assert "calm" in res.output


def test_cli_extract_never_replaces_a_file_without_force(tiny_models, tmp_path):
    """The one overwrite rule: an existing vector is replaced only with --force, and --force
    replaces only the files of a previous extraction."""
    d = tiny_models("llama")
    out, recipe = tmp_path / "calm.safetensors", str(_recipe(tmp_path))

    def cmd(o, *extra):
        return ["extract", "-r", recipe, "-m", str(d), "-o", str(o), "--max-new-tokens", "3", "--temperature",
                "0", "--eval-pairs", "1", *extra]

    args = cmd(out)
    assert CliRunner().invoke(main, args).exit_code == 0
    files = sibling_paths(out)
    before = {k: p.read_bytes() for k, p in files.items()}
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "already holds a vector file: pass --force" in res.output, res.output
    assert "Traceback" not in res.output and {k: p.read_bytes() for k, p in files.items()} == before
    res = CliRunner().invoke(main, args + ["--force"])  # the cache makes this instant
    assert res.exit_code == 0, res.output
    assert "using cached extraction" in res.output and files["response_avg"].read_bytes() == before["response_avg"]
    # --force never replaces a file that is not a previous extraction's, the main one or a sibling
    files["plot"].write_text("my own notes")
    res = CliRunner().invoke(main, args + ["--force"])
    assert res.exit_code == 2 and "is not a previous plot" in res.output, res.output
    assert files["plot"].read_text() == "my own notes"
    assert files["response_avg"].read_bytes() == before["response_avg"]
    other = tmp_path / "notes.safetensors"
    other.write_text("not a vector")
    res = CliRunner().invoke(main, cmd(other, "--force"))
    assert res.exit_code == 2 and "is not a previous vector file" in res.output, res.output
    assert other.read_text() == "not a vector" and not list(tmp_path.glob(".*partial*"))


def test_extract_refuses_an_existing_output_before_generating(tiny_models, tmp_path, monkeypatch):
    import bakery.extraction.extract as ex

    d = tiny_models("llama")
    out = tmp_path / "v.safetensors"
    out.write_text("someone else's file")
    monkeypatch.setattr(ex, "capture", lambda *a, **k: pytest.fail("generated before checking -o"))
    for force in (False, True):
        with pytest.raises(FileExistsError, match=str(out)):
            extract(_recipe(tmp_path), d, out=out, force=force, settings=ExtractSettings(**FAST), progress=False)
    assert out.read_text() == "someone else's file"


@pytest.mark.slow
@pytest.mark.full  # a full extraction of the embedded model (CI extracts on tiny models)
def test_pirate_on_embedded_model(smol_dir, tmp_path):
    """Defaults on the real model: AUC >= 0.9 at the recommended layer on held-out questions, and
    steering there at coef 2 turns plain answers into pirate talk."""
    import re

    from bakery.steering.side_by_side import steer_compare

    out = tmp_path / "pirate.safetensors"
    art = extract("pirate", smol_dir, out=out, progress=False)
    L = art.meta["recommended_layer"]
    assert art.meta["layers"][L]["auc"] >= 0.9
    assert 1 <= L < art.num_layers
    rows = steer_compare(["How do I cook rice?", "What should I do on a rainy day?"],
                         vector_path=str(out), layer=L, coef=2.0, model=str(smol_dir), max_new_tokens=32)
    pirate = re.compile(r"\b(aye|arr+|matey|ye|ahoy|me hearties|lad)\b", re.I)
    for _, base, steered in rows:
        assert not pirate.search(base) and pirate.search(steered), (base, steered)
