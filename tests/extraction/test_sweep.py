"""``bakery sweep`` on a tiny model: the grid, its measures, the suggestion and the files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from openai_server import OpenAIServer, score_reply
from bakery.extraction.judge import COHERENCE_RUBRIC
from bakery.extraction import sweep as sw
from bakery.cli import main
from bakery.steering.generation import generate, render_chat
from bakery.extraction.judge import Judge
from bakery.models import load_model, load_tokenizer
from bakery.steering.hooks import blocks_of, steer
from bakery.vectors.artifact import VectorArtifact, VectorError

PROMPTS = ["hello sea", "the quick brown fox", "tell me about ships"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BAKERY_CACHE", str(tmp_path / "cache"))


def _setup(tiny_models, tmp_path):
    d = tiny_models("llama")
    m, tok = load_model(d), load_tokenizer(d)
    g = torch.Generator().manual_seed(0)
    art = VectorArtifact(torch.randn(5, 32, generator=g), {"trait": "calm"})
    path = art.save(tmp_path / "calm.safetensors")
    return d, m, tok, art, path


def test_parse_layers_and_coefs():
    assert sw.parse_layers("2-6:2", 30) == [2, 4, 6]
    assert sw.parse_layers("8,3,8", 30) == [3, 8]
    with pytest.raises(sw.SweepError, match="out of range.*1..29"):
        sw.parse_layers("0-3", 30)
    with pytest.raises(sw.SweepError, match="cannot read layers"):
        sw.parse_layers("ten", 30)
    assert sw.parse_coefs("1, 2,-4") == [1.0, 2.0, -4.0]
    with pytest.raises(sw.SweepError, match="cannot read coefs"):
        sw.parse_coefs("1,x")


def test_distinct2():
    assert sw.distinct2("aye aye aye aye aye") == pytest.approx(0.25)
    assert sw.distinct2("a fine day at sea") == 1.0


def test_grid_measures_zero_coef_is_the_base(tiny_models, tmp_path):
    _, m, tok, art, _ = _setup(tiny_models, tmp_path)
    res = sw.sweep(art, m, tok, [1, 2], [0.0, 8.0], prompts=PROMPTS, max_new_tokens=6, progress=False)
    cells = {(c.layer, c.coef): c for c in res.cells}
    assert len(cells) == 4
    for L in (1, 2):
        zero, big = cells[(L, 0.0)], cells[(L, 8.0)]
        assert zero.kl == pytest.approx(0.0, abs=1e-6)
        assert zero.answers == res.base_answers
        assert zero.projection == pytest.approx(zero.projection_base, abs=1e-5)
        assert zero.shift == pytest.approx(0.0, abs=1e-5)
        norm = float(art.vectors[L].norm())
        assert big.shift == pytest.approx((big.projection - big.projection_base) / norm)
        assert big.kl > 1e-3
    assert res.suggested is not None and res.suggested in cells


def test_suggest_rules():
    mk = lambda L, c, shift, kl, d2, tr=None, co=None: sw.Cell(L, c, shift * 10, 0.0, shift, kl, d2, tr, co)
    cells = [mk(1, 1, 1.0, 0.1, 0.9, 30, 90), mk(1, 4, 5.0, 0.5, 0.8, 70, 60),
             mk(1, 8, 9.0, 5.0, 0.2, 95, 20)]
    assert sw.suggest(cells, judged=True, coherence_threshold=50)[0] == (1, 4)
    assert sw.suggest(cells, judged=True, coherence_threshold=95)[0] is None
    assert sw.suggest(cells, judged=False, min_distinct=0.6, max_kl=3)[0] == (1, 4)
    assert sw.suggest(cells, judged=False, min_distinct=0.85, max_kl=3)[0] == (1, 1)


def test_judged_sweep_and_files(tiny_models, tmp_path):
    _, m, tok, art, _ = _setup(tiny_models, tmp_path)

    def handler(body):
        text = body["messages"][0]["content"]
        return score_reply({"70": 1.0} if text.startswith(COHERENCE_RUBRIC.split("{")[0]) else {"40": 0.5, "60": 0.5})

    with OpenAIServer(handler) as srv:
        judge = Judge("j", base_url=srv.base_url, api_key="k", cache_dir=tmp_path / "jc")
        res = sw.sweep(art, m, tok, [2], [1.0, 2.0], prompts=PROMPTS, max_new_tokens=4, judge=judge,
                       rubric="Q {question} A {answer}", progress=False)
    assert all(c.trait == pytest.approx(50) and c.coherence == pytest.approx(70) for c in res.cells)
    assert res.base_trait == pytest.approx(50)
    files = sw.save(res, tmp_path / "out.sweep")
    data = json.loads(files["json"].read_text())
    assert data["suggested"]["layer"] == 2 and len(data["cells"]) == 2
    assert files["plot"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(sw.SweepError, match="rubric"):
        sw.sweep(art, m, tok, [2], [1.0], prompts=PROMPTS, judge=judge, progress=False)


def test_refuses_post_norm_row_and_wrong_model(tiny_models, tmp_path):
    _, m, tok, art, _ = _setup(tiny_models, tmp_path)
    with pytest.raises(VectorError, match="last row"):
        sw.sweep(art, m, tok, [4], [1.0], prompts=PROMPTS, progress=False)
    wrong = VectorArtifact(torch.randn(5, 16))
    with pytest.raises(VectorError, match="hidden size"):
        sw.sweep(wrong, m, tok, [1], [1.0], prompts=PROMPTS, progress=False)


def test_cli_sweep(tiny_models, tmp_path):
    d, _, _, _, path = _setup(tiny_models, tmp_path)
    args = ["sweep", "-v", str(path), "-m", str(d), "--layers", "1-2", "--coefs", "0,4",
            "--max-new-tokens", "4", "-p", "hello sea", "-p", "ships"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "suggested" in res.output or "no suggestion" in res.output
    assert (tmp_path / "calm.sweep" / "sweep.png").is_file()
    res = CliRunner().invoke(main, args[:1] + ["--trait", "nothing-cached"] + args[3:])
    assert res.exit_code == 2 and "bakery extract --recipe nothing-cached" in res.output


def _reference_kl(m, tok, art, L, c, positions, prompts, max_new_tokens):
    """The steered answers and their KL(steered || base), teacher-forced with a hand-made hook that
    adds ``c * v[L]`` only where ``positions`` says (the prompt is the generation's input width)."""
    texts = [render_chat(tok, p) for p in prompts]
    with steer(m, art, L, c, positions=positions):
        g = generate(m, tok, texts, max_new_tokens=max_new_tokens)
    P, S = g.prompt_len, g.sequences.shape[1]
    where = torch.arange(S) < P if positions == "prompt" else torch.arange(S) >= P
    delta = c * art.vectors[L].float() * where.view(1, S, 1).float()

    def hook(module, args, out):
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

    with torch.no_grad():
        kw = dict(input_ids=g.sequences, attention_mask=g.attention_mask)
        base = m(**kw).logits
        handle = blocks_of(m)[L - 1].register_forward_hook(hook)
        try:
            st = m(**kw).logits
        finally:
            handle.remove()
    lp_s = F.log_softmax(st[:, P - 1:-1].float(), -1)
    lp_b = F.log_softmax(base[:, P - 1:-1].float(), -1)
    resp = g.attention_mask[:, P:].float()
    kl = ((lp_s.exp() * (lp_s - lp_b)).sum(-1) * resp).sum() / resp.sum()
    return g.texts, float(kl)


@pytest.mark.parametrize("positions", ["prompt", "response"])
def test_kl_steers_only_the_chosen_positions(tiny_models, tmp_path, positions):
    # the teacher-forced pass has no KV cache: without the prompt length, "response" steered
    # nothing (KL 0) and "prompt" steered every position
    _, m, tok, art, _ = _setup(tiny_models, tmp_path)
    L, c = 2, 8.0
    res = sw.sweep(art, m, tok, [L], [c], prompts=PROMPTS, max_new_tokens=6, positions=positions,
                   progress=False)
    answers, kl = _reference_kl(m, tok, art, L, c, positions, PROMPTS, 6)
    cell = res.cells[0]
    assert cell.answers == answers
    assert kl > 1e-3
    assert cell.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)


def test_kl_response_is_not_zero_nor_all(tiny_models, tmp_path):
    _, m, tok, art, _ = _setup(tiny_models, tmp_path)
    kl = {pos: sw.sweep(art, m, tok, [2], [8.0], prompts=PROMPTS, max_new_tokens=6, positions=pos,
                        progress=False).cells[0].kl for pos in ("all", "response")}
    assert kl["response"] > 1e-3
    assert kl["response"] != pytest.approx(kl["all"], rel=1e-3)


def _tiny_result() -> sw.SweepResult:
    cell = sw.Cell(1, 2.0, 1.5, 0.5, 0.25, 0.1, 0.9, answers=["arr"])
    return sw.SweepResult([cell], [1], [2.0], ["hello"], ["hi"], None, None, (1, 2.0), "rule")


def test_save_refuses_to_wipe_a_folder(tmp_path):
    res = _tiny_result()
    # a missing folder, then an empty one
    assert sw.save(res, tmp_path / "new")["json"].is_file()
    (tmp_path / "empty").mkdir()
    assert sw.save(res, tmp_path / "empty")["plot"].is_file()

    # a previous sweep's folder: only with force
    prev = tmp_path / "new"
    (prev / "sweep.json").write_text("old")
    with pytest.raises(FileExistsError, match="--force") as e:
        sw.save(res, prev)
    assert str(prev) in str(e.value)
    assert (prev / "sweep.json").read_text() == "old"
    files = sw.save(res, prev, force=True)
    assert json.loads(files["json"].read_text())["suggested"]["layer"] == 1
    assert sorted(p.name for p in prev.iterdir()) == ["sweep.json", "sweep.png"]

    # a folder holding anything else: never, force or not
    for name, extra in [("results", ["notes.txt"]), ("mixed", ["sweep.json", "sweep.png", "notes.txt"]),
                        ("pngonly", ["sweep.png"])]:
        folder = tmp_path / name
        folder.mkdir()
        for f in extra:
            (folder / f).write_text("keep me")
        for force in (False, True):
            with pytest.raises(FileExistsError, match="choose another -o") as e:
                sw.save(res, folder, force=force)
            assert str(folder) in str(e.value)
        assert sorted(p.name for p in folder.iterdir()) == sorted(extra)
        assert all((folder / f).read_text() == "keep me" for f in extra)
    sub = tmp_path / "withsub"
    (sub / "sweep.json").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="choose another -o"):
        sw.save(res, sub, force=True)
    assert (sub / "sweep.json").is_dir()
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(FileExistsError, match="choose another -o"):
        sw.save(res, tmp_path / "afile", force=True)
    assert (tmp_path / "afile").read_text() == "keep me"
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_sweep_output_folder(tiny_models, tmp_path):
    d, _, _, _, path = _setup(tiny_models, tmp_path)
    args = ["sweep", "-v", str(path), "-m", str(d), "--layers", "1", "--coefs", "4",
            "--max-new-tokens", "3", "-p", "hello sea"]
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("keep me")
    for extra in ([], ["--force"]):
        res = CliRunner().invoke(main, args + ["-o", str(results)] + extra)
        assert res.exit_code == 2, res.output
        assert str(results) in res.output and "choose another -o" in res.output
        assert "wrote" not in res.output
    assert [p.name for p in results.iterdir()] == ["notes.txt"]
    assert (results / "notes.txt").read_text() == "keep me"

    out = tmp_path / "calm.sweep"  # the default folder beside the vector
    assert CliRunner().invoke(main, args).exit_code == 0
    (out / "sweep.json").write_text("old")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--force" in res.output
    assert (out / "sweep.json").read_text() == "old"
    res = CliRunner().invoke(main, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "sweep.json").read_text())["cells"]
