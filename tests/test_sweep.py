"""``bakery sweep`` on a tiny model: the grid, its measures, the suggestion and the files."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from openai_server import OpenAIServer, score_reply
from bakery import sweep as sw
from bakery.cli import main
from bakery.judge import Judge
from bakery.models import load_model, load_tokenizer
from bakery.vectors import VectorArtifact, VectorError

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
        return score_reply({"70": 1.0} if "coherence" in text else {"40": 0.5, "60": 0.5})

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
