"""The judge against a loopback OpenAI-compatible server, through the real ``openai`` client."""

from __future__ import annotations

import math

import pytest

from openai_server import OpenAIServer, Reply, score_reply
from bakery.extraction.judge import COHERENCE_RUBRIC, Judge, JudgeError, aggregate

RUBRIC = "Is this pirate speech?\nQ: {question}\nA: {answer}\nScore 0-100."


def _judge(srv: OpenAIServer, tmp_path, **kw) -> Judge:
    kw.setdefault("backoff", 0.01)
    return Judge("judge-test", base_url=srv.base_url, api_key="sk-test-secret",
                 cache_dir=tmp_path / "cache", **kw)


def test_aggregate_weights_integers_and_applies_quarter_rule():
    lp = math.log
    assert aggregate([("80", lp(0.5)), ("90", lp(0.25)), ("cat", lp(0.25))]) == pytest.approx(
        (0.5 * 80 + 0.25 * 90) / 0.75)
    assert aggregate([(" 100", lp(0.3)), ("101", lp(0.6))]) == pytest.approx(100)  # 101 is not a score
    assert aggregate([("7", lp(0.2)), ("yes", lp(0.8))]) is None  # 0.2 < a quarter
    assert aggregate([("7", lp(0.25)), ("yes", lp(0.75))]) == pytest.approx(7)


def test_scores_are_logprob_weighted_through_the_openai_client(tmp_path):
    def handler(body):
        text = body["messages"][0]["content"]
        if "coheren" in text.lower():
            return score_reply({"100": 0.5, "50": 0.5})
        if "arr" in text:
            return score_reply({"90": 0.6, "70": 0.2, "Sure": 0.2})
        return score_reply({"10": 0.1, "hello": 0.9})

    with OpenAIServer(handler) as srv:
        j = _judge(srv, tmp_path)
        scores = j.trait_scores(RUBRIC, [("hi?", "arr matey"), ("hi?", "hello there")])
        coh = j.coherence_scores([("hi?", "arr matey")])
        body = srv.requests[0]
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["temperature"] == 0
        assert all(h == "Bearer sk-test-secret" for h in srv.auth_headers)
    assert scores[0] == pytest.approx((0.6 * 90 + 0.2 * 70) / 0.8)
    assert scores[1] is None  # only 10% of the mass on integers
    assert coh[0] == pytest.approx(75)
    assert "sk-test-secret" not in repr(j)


def test_retries_after_500_then_succeeds(tmp_path):
    with OpenAIServer(lambda b: score_reply({"42": 1.0})) as srv:
        srv.fail_next(2, status=500)
        j = _judge(srv, tmp_path)
        assert j.trait_scores(RUBRIC, [("q", "a")]) == [pytest.approx(42)]
        assert srv.count == 3 and j.calls == 3


def test_gives_up_with_clear_error_after_retries(tmp_path):
    with OpenAIServer() as srv:
        srv.fail_next(10, status=503)
        j = _judge(srv, tmp_path, max_retries=2)
        with pytest.raises(JudgeError, match="failed after 3 attempts"):
            j.trait_scores(RUBRIC, [("q", "a")])
        assert srv.count == 3


def test_client_errors_are_not_retried(tmp_path):
    with OpenAIServer() as srv:
        srv.fail_next(1, status=401)
        j = _judge(srv, tmp_path)
        with pytest.raises(JudgeError, match="HTTP 401"):
            j.ping()
        assert srv.count == 1


def test_cache_hits_make_no_new_calls(tmp_path):
    with OpenAIServer(lambda b: score_reply({"60": 1.0})) as srv:
        pairs = [(f"q{i}", f"a{i}") for i in range(12)] + [("q0", "a0")]  # one duplicate
        first = _judge(srv, tmp_path, concurrency=4).trait_scores(RUBRIC, pairs)
        n = srv.count
        assert n == 12  # the duplicate prompt is asked once
        again = _judge(srv, tmp_path).trait_scores(RUBRIC, pairs)  # a new Judge, same cache dir
        assert srv.count == n and again == first
        cached = list((tmp_path / "cache").rglob("*.json"))
        assert len(cached) == 12
        assert all("sk-test-secret" not in p.read_text() for p in cached)
    # the same model name served elsewhere is another judge: asked again, its own scores
    with OpenAIServer(lambda b: score_reply({"20": 1.0})) as other:
        assert _judge(other, tmp_path).trait_scores(RUBRIC, pairs[:3]) == [pytest.approx(20)] * 3
        assert other.count == 3


def test_unreachable_judge_is_a_clear_error(tmp_path):
    with OpenAIServer() as srv:
        url = srv.base_url
    j = Judge("judge-test", base_url=url, api_key="k", cache_dir=tmp_path, max_retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match="failed after 2 attempts.*reachable"):
        j.ping()


def test_server_without_logprobs_is_named(tmp_path):
    with OpenAIServer(lambda b: Reply(content="50", omit_logprobs=True)) as srv:
        with pytest.raises(JudgeError, match="no top_logprobs"):
            _judge(srv, tmp_path).trait_scores(RUBRIC, [("q", "a")])


def test_missing_key_without_base_url(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        Judge("gpt-x", cache_dir=tmp_path)


def test_coherence_rubric_has_placeholders():
    assert "{question}" in COHERENCE_RUBRIC and "{answer}" in COHERENCE_RUBRIC


def test_concurrency_is_bounded(tmp_path):
    import threading

    active, peak, lock = [0], [0], threading.Lock()

    def handler(body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        import time

        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return score_reply({"5": 1.0})

    with OpenAIServer(handler) as srv:
        _judge(srv, tmp_path, concurrency=3).trait_scores(RUBRIC, [(str(i), "a") for i in range(12)])
    assert 1 < peak[0] <= 3
