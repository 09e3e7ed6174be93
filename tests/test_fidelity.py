import torch

from bakery.fidelity.metrics import measure, model_scorer, sample_trajectories, drift
from bakery.steering.generation import render_chat
from bakery.models import load_model, load_tokenizer
from bakery.steering.hooks import steer


def _setup(tiny_models):
    d = tiny_models("llama")
    m, tok = load_model(d), load_tokenizer(d)
    v = torch.randn(m.config.num_hidden_layers + 1, m.config.hidden_size)
    prompts = [render_chat(tok, q) for q in ("hello sea", "the quick fox", "tell me about ships")]
    return m, tok, v, prompts


def test_reference_against_itself_recovers_everything_and_base_nothing(tiny_models):
    m, tok, v, prompts = _setup(tiny_models)
    ref_ctx = lambda P: steer(m, v, 2, 4.0, positions="all")
    traj = sample_trajectories(m, tok, prompts, ref_ctx, max_new_tokens=8, batch_size=2)
    assert traj.num_response_tokens > 0
    ref = model_scorer(m, ref_ctx)
    base = model_scorer(m)
    half = model_scorer(m, lambda P: steer(m, v, 2, 2.0))
    res = measure(traj, ref, base, {"self": ref, "base": base, "half": half})
    assert res["self"].kl < 1e-6 and abs(res["self"].recovered - 1) < 1e-4
    assert res["self"].top1 == 1.0
    assert res["base"].kl_base > 1e-3 and abs(res["base"].recovered) < 1e-6
    assert 0.0 < res["half"].recovered < 1.0


def test_response_positions_reference_needs_prompt_len(tiny_models):
    m, tok, v, prompts = _setup(tiny_models)
    resp = lambda P: steer(m, v, 2, 4.0, positions="response", prompt_len=P)
    allpos = model_scorer(m, lambda P: steer(m, v, 2, 4.0, positions="all"))
    traj = sample_trajectories(m, tok, prompts, lambda P: steer(m, v, 2, 4.0, positions="response"),
                               max_new_tokens=8, batch_size=3)
    res = measure(traj, model_scorer(m, resp), model_scorer(m), {"all": allpos})
    # steering the prompt as well is a different model: not a perfect match
    assert res["all"].kl > 1e-4
    assert drift(traj, model_scorer(m), model_scorer(m)) < 1e-9
