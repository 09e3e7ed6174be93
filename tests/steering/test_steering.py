import pytest
import torch

from bakery.arch import spec_for
from bakery.steering.generation import encode_prompts, generate, render_chat
from bakery.models import load_model, load_tokenizer
from bakery.steering.hooks import Ablation, Steering, SteeringTerm, blocks_of, steer


def _load(tiny_models, mt="llama"):
    d = tiny_models(mt)
    return load_model(d), load_tokenizer(d)


def _vec(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size, generator=g)


def _hidden(model, enc, ctx=None):
    with torch.no_grad():
        if ctx is None:
            return model(**enc, output_hidden_states=True).hidden_states
        with ctx:
            return model(**enc, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steered_row_differs_by_exactly_coef_v_at_steered_positions(tiny_models, positions):
    model, tok = _load(tiny_models)
    v = _vec(model)
    enc = encode_prompts(tok, [render_chat(tok, "hello sea"), render_chat(tok, "the quick brown fox jumps")])
    S = enc["input_ids"].shape[1]
    P = S - 3  # teacher-forced: the last 3 positions play the response
    base = _hidden(model, enc)
    hooked = _hidden(model, enc, steer(model, v, 2, 3.0, positions=positions, prompt_len=P))
    diff = hooked[2] - base[2]
    expected_mask = {"all": torch.ones(S, dtype=torch.bool),
                     "prompt": torch.arange(S) < P,
                     "response": torch.arange(S) >= P}[positions]
    assert torch.allclose(diff[:, expected_mask], (3.0 * v[2]).expand_as(diff[:, expected_mask]), atol=1e-5)
    if (~expected_mask).any():
        assert diff[:, ~expected_mask].abs().max().item() == 0.0
    # rows before the steered one are untouched
    assert torch.equal(hooked[1], base[1])


def test_several_layers_sum_like_separate_hooks(tiny_models):
    model, tok = _load(tiny_models)
    v = _vec(model)
    enc = encode_prompts(tok, [render_chat(tok, "hello sea")])
    terms = [SteeringTerm(1, v[1], 1.0), SteeringTerm(3, v[3], -2.0), SteeringTerm(3, v[2], 0.5)]
    hs = _hidden(model, enc, Steering(model, terms))
    with torch.no_grad(), steer(model, v, 1, 1.0):
        with Steering(model, [SteeringTerm(3, v[3], -2.0)]), Steering(model, [SteeringTerm(3, v[2], 0.5)]):
            ref = model(**enc, output_hidden_states=True).hidden_states
    for a, b in zip(hs, ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_hooks_are_removed_on_exit(tiny_models):
    model, tok = _load(tiny_models)
    enc = encode_prompts(tok, [render_chat(tok, "hello sea")])
    before = _hidden(model, enc)[-1]
    counts = [len(b._forward_hooks) for b in blocks_of(model)]
    with steer(model, _vec(model), 2, 5.0):
        assert len(blocks_of(model)[1]._forward_hooks) == counts[1] + 1
    assert torch.equal(_hidden(model, enc)[-1], before)
    assert [len(b._forward_hooks) for b in blocks_of(model)] == counts


def test_left_padded_batch_matches_single_rows(tiny_models):
    model, tok = _load(tiny_models)
    v = _vec(model)
    prompts = [render_chat(tok, "hi"), render_chat(tok, "tell me about the sea and the ships")]
    batch = generate_steered(model, tok, prompts, v)
    for i, p in enumerate(prompts):
        single = generate_steered(model, tok, [p], v)
        assert batch.texts[i] == single.texts[0]


def generate_steered(model, tok, prompts, v):
    with steer(model, v, 2, 4.0, positions="response"):
        return generate(model, tok, prompts, max_new_tokens=6, suppress_eos=True)


def test_response_steering_leaves_prefill_untouched_during_generate(tiny_models):
    model, tok = _load(tiny_models)
    v = _vec(model)
    L = 2
    block = blocks_of(model)[L - 1]
    captured: list[torch.Tensor] = []
    cap = block.register_forward_hook(lambda m, a, o: captured.append((o[0] if isinstance(o, tuple) else o).clone()))
    enc = encode_prompts(tok, [render_chat(tok, "hello sea")])

    def run(ctx):
        captured.clear()
        with torch.no_grad(), ctx:
            model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        return list(captured)

    import contextlib

    base = run(contextlib.nullcontext())
    cap.remove()
    # the capture hook must run before the steering hook, so register it again after steering
    handles = []
    with torch.no_grad(), steer(model, v, L, 2.0, positions="response"):
        handles.append(block.register_forward_hook(lambda m, a, o: captured.append((o[0] if isinstance(o, tuple) else o).clone())))
        captured.clear()
        model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    for h in handles:
        h.remove()
    steered = list(captured)
    assert len(base) == len(steered) == 4  # prefill + 3 decode steps
    assert torch.equal(steered[0], base[0]), "the prompt's prefill must not be steered"
    for t in range(1, 4):  # each decode step sees exactly +2v at the new token
        assert steered[t].shape[1] == 1
    # the first generated token came from an unsteered prefill, so the first decode step input is
    # the same token: its block output differs by exactly 2v
    assert torch.allclose(steered[1] - base[1], (2.0 * v[L]).view(1, 1, -1), atol=1e-5)


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_generate_with_kv_cache_matches_a_teacher_forced_pass(tiny_models, positions):
    """Greedy tokens generated under steering (KV cache, one token per step) are the argmax of a
    single full forward pass over the final sequence steered at the same positions."""
    model, tok = _load(tiny_models)
    v = _vec(model)
    prompts = [render_chat(tok, "hi"), render_chat(tok, "tell me about the sea and the ships")]
    with steer(model, v, 2, 6.0, positions=positions):
        g = generate(model, tok, prompts, max_new_tokens=6, suppress_eos=True)
    P = g.prompt_len
    with torch.no_grad(), steer(model, v, 2, 6.0, positions=positions, prompt_len=P):
        logits = model(input_ids=g.sequences, attention_mask=g.attention_mask).logits
    predicted = logits[:, P - 1:-1].argmax(-1)
    assert torch.equal(predicted, g.sequences[:, P:])
    with torch.no_grad():
        plain = model(input_ids=g.sequences, attention_mask=g.attention_mask).logits
    assert not torch.allclose(plain[:, P - 1:-1], logits[:, P - 1:-1], atol=1e-3)


def _residual_states(model, enc, spec):
    """Every residual-stream state: block inputs, the mid-block residual, block outputs."""
    states = []
    handles = []
    for blk in blocks_of(model, spec):
        handles.append(blk.register_forward_pre_hook(
            lambda m, a, kw: states.append(("in", (kw.get("hidden_states") if kw.get("hidden_states") is not None else a[0]).clone())),
            with_kwargs=True))
        if spec.mid_norm and not model.config.to_dict().get("use_parallel_residual", False):
            handles.append(blk.get_submodule(spec.mid_norm).register_forward_pre_hook(
                lambda m, a: states.append(("mid", a[0].clone()))))
        handles.append(blk.register_forward_hook(
            lambda m, a, o: states.append(("out", (o[0] if isinstance(o, tuple) else o).clone()))))
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    return states


def test_ablation_makes_every_residual_state_orthogonal(tiny_models, arch_type):
    model, tok = _load(tiny_models, arch_type)
    spec = spec_for(model.config)
    r = torch.randn(model.config.hidden_size)
    r = r / r.norm()
    enc = encode_prompts(tok, [render_chat(tok, "hello sea"), render_chat(tok, "the fox")])
    base = _residual_states(model, enc, spec)
    with Ablation(model, r):
        states = _residual_states(model, enc, spec)
    kinds = {k for k, _ in states}
    assert "in" in kinds and "out" in kinds
    base_max = max((s @ r).abs().max().item() for _, s in base)
    assert base_max > 1e-2  # without ablation the direction is present
    for kind, s in states:
        if spec.sandwich and kind == "mid" and spec.mid_norm is None:
            continue
        assert (s @ r).abs().max().item() < 1e-4, f"{arch_type}: {kind} state not orthogonal"


def test_steering_rejects_bad_layer_and_positions(tiny_models):
    model, _ = _load(tiny_models)
    v = _vec(model)
    with pytest.raises(ValueError, match="out of range"):
        steer(model, v, 0, 1.0)
    with pytest.raises(ValueError, match="positions must be one of"):
        steer(model, v, 1, 1.0, positions="middle")
    with pytest.raises(ValueError, match="zero vector"):
        Ablation(model, torch.zeros(model.config.hidden_size))


def test_steering_follows_the_dtype_of_the_hooked_block(tiny_models):
    """A float32 vector on a bf16 model is added in bf16 where the block runs: the steered states
    equal the unsteered ones plus the vector rounded to bf16, at the steered layer only."""
    d = tiny_models("llama")
    m, tok = load_model(d, dtype="bfloat16"), load_tokenizer(d)
    v = _vec(m) * 0.5
    enc = encode_prompts(tok, ["hello sea", "the quick fox"])
    base = _hidden(m, enc)
    steered = _hidden(m, enc, steer(m, v, 2, 3.0))
    assert steered[2].dtype == torch.bfloat16
    want = base[2] + (3.0 * v[2]).to(torch.bfloat16)
    assert torch.equal(steered[2], want)
    assert torch.equal(steered[1], base[1])
