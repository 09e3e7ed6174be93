"""The judge against a real OpenAI-compatible server: vLLM's own API server (CPU build, in
.venv-vllm) serving the embedded SmolLM2, next to the loopback server of test_judge.py.

The embedded model is far too small to be a useful judge (it splits numbers into digits, so most
rubric answers fall under the quarter-mass rule); what these tests hold the judge to is reading a
real server right: its score is the model's own next-token distribution, aggregated, as
transformers computes it; the cache and the errors work against the real server."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

from bakery.engines.vllm import find_vllm_python
from bakery.extraction.judge import TOP_LOGPROBS, Judge, JudgeError, aggregate
from bakery.models import load_model, load_tokenizer, resolve_model

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.full]  # a second real vLLM server (CI's: test_vllm.py)

SERVED = "smollm2-judge"
# One prompt whose first token is mostly a digit (a score), one whose integer mass is under a quarter.
SCORED = "Pick a number from 1 to 9. Reply with the digit only."
UNSCORED = "Describe the sea in one sentence."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    python = find_vllm_python()
    model = resolve_model()
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
           "--max-logprobs", str(TOP_LOGPROBS)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM's server exited ({proc.returncode}):\n" + log.read_text()[-3000:])
            try:
                urllib.request.urlopen(f"{base}/models", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("vLLM's server did not come up in 900 s:\n" + log.read_text()[-3000:])
                time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _transformers_score(prompt: str) -> tuple[float | None, list[tuple[str, float]]]:
    """The judge's aggregate computed from transformers' next-token distribution of the same chat."""
    model_dir = resolve_model()
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    top = torch.topk(logp, TOP_LOGPROBS)
    tops = [(tok.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]
    return aggregate(tops), tops


def test_judge_score_is_the_served_models_own_distribution(vllm_server, tmp_path):
    judge = Judge(SERVED, base_url=vllm_server, cache_dir=tmp_path / "cache")
    scored, unscored = judge.score_prompts([SCORED, UNSCORED])
    want, tops = _transformers_score(SCORED)
    assert want is not None and scored is not None
    assert scored == pytest.approx(want, abs=0.02)
    integer_mass = sum(math.exp(lp) for t, lp in tops if t.strip().isdigit())
    assert integer_mass >= 0.25
    assert _transformers_score(UNSCORED)[0] is None and unscored is None  # under the quarter rule
    assert judge.calls == 2


def test_coherence_and_cache_against_the_real_server(vllm_server, tmp_path):
    pairs = [("How do I boil rice?", "Rinse it, add two cups of water per cup, simmer for 15 minutes."),
             ("How do I boil rice?", "rice rice the the of of purple seven seven seven")]
    first = Judge(SERVED, base_url=vllm_server, cache_dir=tmp_path / "cache")
    scores = first.coherence_scores(pairs)
    assert len(scores) == 2 and first.calls == 2
    assert all(s is None or 0 <= s <= 100 for s in scores)
    again = Judge(SERVED, base_url=vllm_server, cache_dir=tmp_path / "cache")
    assert again.coherence_scores(pairs) == scores and again.calls == 0  # all from the cache
    # the same model name at another endpoint is another judge: no cache hit
    other = Judge(SERVED, base_url=vllm_server.replace("127.0.0.1", "localhost"), cache_dir=tmp_path / "cache")
    other.coherence_scores(pairs[:1])
    assert other.calls == 1


def test_unknown_judge_model_is_named(vllm_server, tmp_path):
    judge = Judge("no-such-judge", base_url=vllm_server, cache_dir=tmp_path / "cache", max_retries=0)
    with pytest.raises(JudgeError, match="no-such-judge.*HTTP 404.*--judge-model"):
        judge.score_prompts([SCORED])
