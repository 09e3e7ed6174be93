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


def test_kl_divergence_resolves_rounding_level_differences():
    import torch.nn.functional as F

    from bakery.fidelity.metrics import kl_divergence

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 500, generator=g) * 3
    far = a + torch.randn(6, 500, generator=g)
    textbook = (F.softmax(a.double(), -1)
                * (F.log_softmax(a.double(), -1) - F.log_softmax(far.double(), -1))).sum(-1)
    assert torch.allclose(kl_divergence(a, far), textbook, rtol=1e-9)
    # a float32-rounding-sized difference: KL = Var_p(d) / 2 to second order, 1e-13 here, which
    # the textbook sum in float32 (error ~1e-7) cannot see
    near = a * (1 + torch.finfo(torch.float32).eps * torch.randn(6, 500, generator=g))
    d, p = (a - near).double(), F.softmax(a.double(), -1)
    want = ((p * d * d).sum(-1) - (p * d).sum(-1) ** 2) / 2
    got = kl_divergence(a, near)
    assert torch.allclose(got, want, rtol=1e-3) and (got > 0).all() and got.max() < 1e-11
    assert kl_divergence(a, a).abs().max() == 0
    masked = a.clone()
    masked[:, :3] = float("-inf")  # tokens a model never predicts
    assert torch.isfinite(kl_divergence(masked, masked.clone())).all()


def test_response_logprobs_with_kept_logits(tiny_models):
    from bakery.fidelity.metrics import response_logits, response_logprobs

    logits = torch.randn(2, 7, 11)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    full = response_logprobs(logits, mask, 3)
    assert full.shape == (7, 11) and torch.equal(response_logits(logits, mask, 3), logits[:, 2:6][mask[:, 3:].bool()])
    # the model ran with logits_to_keep=5: only the last 5 positions' logits exist
    assert torch.equal(response_logprobs(logits[:, -5:], mask, 3, kept=5), full)


def test_rounding_jitter_restores_the_model(tiny_models):
    from bakery.fidelity.exact import rounding_jitter

    m, tok, v, prompts = _setup(tiny_models)
    before = {k: t.clone() for k, t in m.state_dict().items()}
    ids = tok(prompts[0], return_tensors="pt")["input_ids"]
    clean = m(input_ids=ids).logits
    with rounding_jitter(m, {"model.layers.1.mlp.down_proj.weight": 2 ** -7}):
        jittered = m(input_ids=ids).logits
    assert not torch.equal(clean, jittered) and (clean - jittered).abs().max() < 0.1
    assert all(torch.equal(before[k], t) for k, t in m.state_dict().items())
    assert torch.equal(m(input_ids=ids).logits, clean)
