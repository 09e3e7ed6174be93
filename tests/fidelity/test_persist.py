"""bakery.fidelity.persist: KV-cached persistence traces against full forward passes, outputs, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from bakery.traits import PromptsError, read_prompts
from bakery.fidelity.persist import (BAKED, STEERED, SWITCH, UNSTEERED, PersistError, PersistSettings, half_life,
                                     load_result, recipe_questions, run_persist, trace_batch, write_outputs)
from bakery.models import load_model, load_tokenizer
from bakery.steering.generation import render_chat
from bakery.steering.hooks import steer
from bakery.vectors.artifact import VectorArtifact, VectorError

PROMPTS = ["Tell me about the sea.", "What is the capital of France? Answer in one word please."]


def _vector(folder: Path, seed: int = 1, scale: float = 3.0) -> VectorArtifact:
    cfg = json.loads((folder / "config.json").read_text())
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    h = cfg.get("hidden_size", cfg.get("n_embd"))
    g = torch.Generator().manual_seed(seed)
    return VectorArtifact(torch.randn(n + 1, h, generator=g) * scale, {"trait": "random"})


def _full_pass_projection(model, tok, bt, layer: int, row: torch.Tensor, coef: float,
                          steered_before: int | None) -> torch.Tensor:
    """(h . v)/|v| at row ``layer`` for every position of the final sequences, from one full
    forward pass with ``output_hidden_states``; steering on positions ``< steered_before``."""
    seqs = bt.sequences
    mask = torch.cat([bt.attention_mask, torch.ones(seqs.shape[0], seqs.shape[1] - bt.prompt_len,
                                                    dtype=bt.attention_mask.dtype)], 1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    table = torch.zeros(layer + 1, row.numel())
    table[layer] = row
    ctx = (steer(model, table, layer, coef, positions="prompt", prompt_len=steered_before)
           if steered_before else torch.no_grad())
    with torch.no_grad(), ctx:
        hs = model(input_ids=seqs, attention_mask=mask, position_ids=pos,
                   output_hidden_states=True).hidden_states[layer]
    return hs.float() @ (row / row.norm())


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_recorded_projection_equals_full_forward_pass(tiny_models, model_type, temperature):
    folder = tiny_models(model_type)
    model, tok = load_model(folder), load_tokenizer(folder)
    vec = _vector(folder)
    layer, coef, N, M = 2, 2.0, 4, 5
    row = vec.vectors[layer]
    texts = [render_chat(tok, p) for p in PROMPTS]  # different lengths: left padding in play
    for steer_tokens in (0, N, N + M):
        bt = trace_batch(model, tok, texts, layer=layer, direction=row, coef=coef,
                         steer_tokens=steer_tokens, total_tokens=N + M, temperature=temperature,
                         seed=3, suppress_eos=True)
        assert bt.sequences.shape[1] == bt.prompt_len + N + M
        assert bt.alive.all() and torch.isfinite(bt.projection).all()
        P = bt.prompt_len
        # the token at P+t was sampled from position P-1+t; steered positions are < P-1+steer_tokens
        full = _full_pass_projection(model, tok, bt, layer, row, coef,
                                     P - 1 + steer_tokens if steer_tokens else None)
        expected = full[:, P - 1:P - 1 + N + M]
        torch.testing.assert_close(bt.projection, expected, atol=2e-4, rtol=1e-4)
        if steer_tokens == N:
            # the check can fail: without steering on the first N positions the numbers differ
            unsteered = _full_pass_projection(model, tok, bt, layer, row, coef, None)
            gap = (bt.projection[:, :N] - unsteered[:, P - 1:P - 1 + N]).abs()
            assert torch.allclose(gap, torch.full_like(gap, coef * float(row.norm())), atol=1e-3)
            # after the switch, no steering: equal to the plain pass at those positions
            torch.testing.assert_close(bt.projection[:, N:], unsteered[:, P - 1 + N:P - 1 + N + M],
                                       atol=2e-4, rtol=1e-4)


def test_tracing_passes_the_cache_under_the_keyword_the_model_takes(tiny_models):
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` and warns on the
    old name at every step: tracing uses the new one and prints no FutureWarning."""
    import warnings

    from bakery.fidelity.persist.trace import cache_keyword

    folder = tiny_models("llama")
    model, tok = load_model(folder), load_tokenizer(folder)
    assert cache_keyword(model) == "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        trace_batch(model, tok, [render_chat(tok, PROMPTS[0])], layer=2, direction=_vector(folder).vectors[2],
                    coef=2.0, steer_tokens=2, total_tokens=3)


def _tiny_llama(tiny_models):
    """The tiny Llama, its tokenizer, row 2 of a random vector and the rendered prompts."""
    folder = tiny_models("llama")
    model, tok = load_model(folder), load_tokenizer(folder)
    return model, tok, _vector(folder).vectors[2], [render_chat(tok, p) for p in PROMPTS]


def test_switch_shares_prefix_with_steered_throughout(tiny_models):
    model, tok, row, texts = _tiny_llama(tiny_models)
    kw = dict(layer=2, direction=row, coef=4.0, total_tokens=8, temperature=1.0, seed=7)
    sw = trace_batch(model, tok, texts, steer_tokens=3, **kw)
    st = trace_batch(model, tok, texts, steer_tokens=8, **kw)
    un = trace_batch(model, tok, texts, steer_tokens=0, **kw)
    P = sw.prompt_len
    assert torch.equal(sw.sequences[:, :P + 3], st.sequences[:, :P + 3])
    torch.testing.assert_close(sw.projection[:, :3], st.projection[:, :3])
    assert not torch.allclose(sw.projection[:, :3], un.projection[:, :3], atol=1e-2)


def _bias_bake(src: Path, dst: Path, layer: int, coef: float, row: torch.Tensor) -> Path:
    """A bias bake by hand (FACTS.md): mlp_bias on, zeros except block L-1's down_proj bias."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(src)
    cfg.mlp_bias = True
    baked = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing = baked.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith(".bias") for k in missing)
    with torch.no_grad():
        for k in missing:
            baked.get_parameter(k).zero_()
        baked.model.layers[layer - 1].mlp.down_proj.bias.copy_(coef * row)
    baked.save_pretrained(dst)
    load_tokenizer(src).save_pretrained(dst)
    return dst


def test_run_persist_writes_outputs_and_bake_trace_matches_steering(tiny_models, tmp_path):
    folder = tiny_models("llama")
    vec = _vector(folder)
    vpath = vec.save(tmp_path / "v.safetensors")
    layer, coef = 2, 2.0
    bake = _bias_bake(folder, tmp_path / "bake", layer, coef, vec.vectors[layer])
    s = PersistSettings(layer=layer, coef=coef, steer_tokens=3, sample_tokens=4, temperature=1.0,
                        seeds=(0, 1), batch_size=1)
    res = run_persist(PROMPTS, s, vector_path=vpath, model=folder, export=bake, progress=False)
    by = {c: [t for t in res.traces if t.condition == c] for c in (UNSTEERED, SWITCH, STEERED, BAKED)}
    assert all(len(v) == 4 for v in by.values())  # 2 prompts x 2 seeds
    for st, bk in zip(by[STEERED], by[BAKED]):  # a bias bake holds the persona as steering does
        assert st.token_ids == bk.token_ids
        assert max(abs(a - b) for a, b in zip(st.projection, bk.projection)) < 1e-3
    summ = res.summary
    norm = float(vec.vectors[layer].norm())
    assert summ["steering_term_projection"] == pytest.approx(coef * norm)
    c = summ["conditions"][SWITCH]
    assert c["mean_own_steered_phase"] == pytest.approx(c["mean_projection_steered_phase"] - coef * norm)
    assert c["mean_own_free_phase"] == pytest.approx(c["mean_projection_free_phase"])

    start = summ["pre_switch_own_excess"]
    assert summ["own_retention"] == (pytest.approx(summ["free_phase_excess"] / start) if start > 0 else None)
    out = write_outputs(res, tmp_path / "out")
    again = load_result(out / "traces.json")  # read back: same traces, same summary
    assert json.dumps(again.summary, sort_keys=True) == json.dumps(res.summary, sort_keys=True)
    assert {p.name for p in out.iterdir()} == {"summary.json", "traces.json", "traces.csv",
                                              "texts.md", "persist.png"}
    data = json.loads((out / "traces.json").read_text())
    assert len(data["traces"]) == 16
    rows = list(csv.DictReader(open(out / "traces.csv")))
    assert len(rows) == 16 * 7
    assert (out / "persist.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="--force"):
        write_outputs(res, out)
    (tmp_path / "out.old").mkdir()  # a user's folder that happens to have the name of a backup
    (tmp_path / "out.old" / "mine.txt").write_text("keep")
    write_outputs(res, out, force=True)
    assert not list(tmp_path.glob(".out.*")) and (tmp_path / "out.old" / "mine.txt").read_text() == "keep"
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())  # an ordinary folder, not mkdtemp's 0700
    other = tmp_path / "notes"
    other.mkdir()
    (other / "n.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a previous persist output"):
        write_outputs(res, other, force=True)
    assert (other / "n.txt").read_text() == "mine"


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_half_life():
    free = [9.0, 7.0, 5.0, 3.0, 1.0, 1.0]
    assert half_life(free, baseline=1.0, start_excess=10.0, window=1) == 2
    assert half_life(free, baseline=1.0, start_excess=10.0, window=3) == 3
    assert half_life([10.0] * 4, baseline=0.0, start_excess=10.0, window=1) is None
    assert half_life(free, baseline=1.0, start_excess=-1.0) is None


@pytest.mark.parametrize("kw, match", [
    (dict(steer_tokens=0), "--steer-tokens must be a positive"),
    (dict(sample_tokens=-2), "--sample-tokens must be a positive"),
    (dict(temperature=-1.0), "--temperature"),
])
def test_bad_settings(tiny_models, tmp_path, kw, match):
    folder = tiny_models("llama")
    vpath = _vector(folder).save(tmp_path / "v.safetensors")
    s = PersistSettings(**{**dict(layer=2, coef=1.0, steer_tokens=2, sample_tokens=2), **kw})
    with pytest.raises(PersistError, match=match):
        run_persist(PROMPTS, s, vector_path=vpath, model=folder, progress=False)


@pytest.mark.parametrize("layer, match", [(0, "out of range"), (9, "out of range"),
                                          (4, "last row")])
def test_bad_layer(tiny_models, tmp_path, layer, match):
    folder = tiny_models("llama")
    vpath = _vector(folder).save(tmp_path / "v.safetensors")
    s = PersistSettings(layer=layer, coef=1.0, steer_tokens=2, sample_tokens=2)
    with pytest.raises(VectorError, match=match):
        run_persist(PROMPTS, s, vector_path=vpath, model=folder, progress=False)


def test_vector_for_another_model(tiny_models, tmp_path):
    folder = tiny_models("llama")
    other = VectorArtifact(torch.randn(5, 48), {"model": "someone/else"})
    vpath = other.save(tmp_path / "v.safetensors")
    s = PersistSettings(layer=2, coef=1.0, steer_tokens=2, sample_tokens=2)
    with pytest.raises(VectorError, match="another model"):
        run_persist(PROMPTS, s, vector_path=vpath, model=folder, progress=False)


def test_cli_end_to_end_and_bad_input(tiny_models, tmp_path):
    from click.testing import CliRunner

    from bakery.cli import main

    folder = tiny_models("llama")
    vpath = _vector(folder).save(tmp_path / "v.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\nTell me about the sea.\n\nHow do I cook rice?\n")
    args = ["persist", "--vector", str(vpath), "--layer", "2", "--coef", "2", "--model", str(folder),
            "--prompts", str(prompts), "--steer-tokens", "3", "--sample-tokens", "3",
            "--seed", "0", "--seed", "1", "--quiet", "--threads", "1"]
    r = CliRunner().invoke(main, args + ["-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "layer 2 = output of block 1" in r.output and "half-life" in r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["settings"]["seeds"] == [0, 1]
    assert summary["summary"]["conditions"][SWITCH]["traces"] == 4

    bad = CliRunner().invoke(main, [a if a != "3" else "0" for a in args] + ["-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--steer-tokens must be a positive" in bad.output
    assert not (tmp_path / "b").exists()
    both = CliRunner().invoke(main, args + ["--recipe", "x", "-o", str(tmp_path / "c")])
    assert both.exit_code == 2 and "one of" in both.output


def test_read_prompts_and_recipe(tmp_path):
    (tmp_path / "p.json").write_text('["a?", "b?"]')
    assert read_prompts(tmp_path / "p.json") == ["a?", "b?"]
    with pytest.raises(ValueError, match="no-such-trait"):
        recipe_questions("no-such-trait")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(PromptsError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(PromptsError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_recipe_questions_from_builtin_recipe():
    recipes = pytest.importorskip("bakery.traits")
    names = recipes.available_traits()
    if not names:
        pytest.skip("no built-in trait recipes")
    qs = recipe_questions(names[0])
    assert qs and all(isinstance(q, str) and q for q in qs)
    assert set(qs).isdisjoint(recipes.load_trait_recipe(names[0]).extract_questions)


@pytest.mark.slow
def test_embedded_model_projection_equals_full_forward_pass(smol_dir):
    model, tok = load_model(smol_dir), load_tokenizer(smol_dir)
    vec = _vector(smol_dir, scale=1.0)
    layer, coef, N, M = 16, 1.5, 3, 3
    row = vec.vectors[layer]
    texts = [render_chat(tok, p) for p in ["How do I bake bread?", "Hi"]]
    bt = trace_batch(model, tok, texts, layer=layer, direction=row, coef=coef, steer_tokens=N,
                     total_tokens=N + M, temperature=1.0, seed=0)
    P = bt.prompt_len
    full = _full_pass_projection(model, tok, bt, layer, row, coef, P - 1 + N)
    torch.testing.assert_close(bt.projection, full[:, P - 1:P - 1 + N + M], atol=2e-3, rtol=1e-4)


def test_allow_eos_ends_a_row_and_keeps_the_rest(tiny_models):
    model, tok, row, texts = _tiny_llama(tiny_models)
    kw = dict(layer=2, direction=row, coef=2.0, steer_tokens=2, total_tokens=6, temperature=0.0)
    free = trace_batch(model, tok, texts, suppress_eos=True, **kw)
    P = free.prompt_len
    stop = int(free.sequences[0, P + 2])  # make row 0's third token the end of sequence
    model.generation_config.eos_token_id = stop
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    ended = trace_batch(model, tok, texts, suppress_eos=False, **kw)
    first = int((free.sequences[0, P:] == stop).nonzero()[0])
    assert ended.alive[0, :first + 1].all() and not ended.alive[0, first + 1:].any()
    assert torch.isnan(ended.projection[0, first + 1:]).all()
    torch.testing.assert_close(ended.projection[0, :first + 1], free.projection[0, :first + 1])
    suppressed = trace_batch(model, tok, texts, suppress_eos=True, **kw)
    assert suppressed.alive.all() and not (suppressed.sequences[:, P:] == stop).any()


def test_missing_inputs_fail_before_any_model_loads(tmp_path):
    s = PersistSettings(layer=2, coef=1.0, steer_tokens=2, sample_tokens=2)
    with pytest.raises(VectorError, match="vector file not found"):
        run_persist(PROMPTS, s, vector_path=tmp_path / "nope.safetensors", model=tmp_path, progress=False)
    vpath = VectorArtifact(torch.randn(5, 32)).save(tmp_path / "v.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        run_persist(PROMPTS, s, vector_path=vpath, model=tmp_path / "no-model", progress=False)
