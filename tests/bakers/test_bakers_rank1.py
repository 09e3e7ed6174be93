"""``bias --route rank1``: a rank-one down-projection update fitted on calibration activations."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from bakery.bakers import bake
from bakery.bakers.errors import BakeError
from bakery.bakers.rank1 import CALIBRATION_PROMPTS
from bakery.fidelity.metrics import measure, model_scorer, sample_trajectories
from bakery.steering.generation import encode_prompts, render_chat
from bakery.models import load_model, load_tokenizer
from bakery.steering.hooks import steer
from helpers import HELD_OUT_TINY, held_out_fidelity
from helpers import reload_strict, tree_digest, vec


def _keys(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_rank1_adds_about_coef_v_at_calibration_tokens(arch, tiny_models, tmp_path):
    src = tiny_models(arch)
    before = tree_digest(src)
    v = vec(src, seed=4)
    out = bake("bias", src, [(v, 2, 3.0)], tmp_path / "out", route="rank1", calibration="prompts",
               progress=False)  # the truncated path: blocks up to L-1 only
    assert tree_digest(src) == before
    assert _keys(out) == _keys(src)  # no new parameters
    baked, base = reload_strict(out), load_model(src)
    m = json.loads((out / "bakery.json").read_text())
    assert m["route"] == "rank1" and m["exact"] is False and m["extra"]["rank1_calibration"] == "prompts"
    fit = m["extra"]["rank1_fit"]["2"]
    assert abs(fit["fit_mean"] - 1) < 0.15 and fit["rows"] > 100  # tiny: 64 MLP dims only
    tok = load_tokenizer(src)
    enc = encode_prompts(tok, [render_chat(tok, q) for q in CALIBRATION_PROMPTS[:8]])
    with torch.no_grad():
        hb = baked(**enc, output_hidden_states=True).hidden_states[2]
        h0 = base(**enc, output_hidden_states=True).hidden_states[2]
    delta = (hb - h0)[enc["attention_mask"].bool()]
    target = 3.0 * v.vectors[2]
    cos = torch.nn.functional.cosine_similarity(delta, target.expand_as(delta), dim=-1)
    assert cos.mean() > 0.9
    assert abs(delta.norm(dim=-1).mean() / target.norm() - 1) < 0.2


def test_rank1_recovers_most_of_the_steering_on_held_out_prompts(tiny_models, tmp_path):
    src = tiny_models("gpt2")
    v = vec(src, seed=4)
    out = bake("bias", src, [(v, 2, 3.0)], tmp_path / "out", route="rank1", progress=False)
    res = held_out_fidelity(src, out, v, 2, 3.0)
    assert res.recovered > 0.8, res.to_dict()


def test_rank1_on_a_sandwich_norm_model_is_approximate_but_helps(tiny_models, tmp_path):
    src = tiny_models("gemma2")
    v = vec(src, seed=4)
    out = bake("bias", src, [(v, 2, 1.0)], tmp_path / "out", route="rank1", progress=False)
    m = json.loads((out / "bakery.json").read_text())
    assert any("sandwich" in n for n in m["extra"]["notes"])
    res = held_out_fidelity(src, out, v, 2, 1.0)
    assert res.recovered > 0.3, res.to_dict()


def test_rank1_several_terms_and_site_check(tiny_models, tmp_path):
    src = tiny_models("llama")
    a, b = vec(src, 1, "a"), vec(src, 2, "b")
    out = bake("bias", src, [(a, 1, 2.0), (b, 3, 1.0)], tmp_path / "out", route="rank1", progress=False)
    assert set(json.loads((out / "bakery.json").read_text())["extra"]["rank1_fit"]) == {"1", "3"}
    with pytest.raises(BakeError, match="attn-out needs the bias route"):
        bake("bias", src, [(a, 1, 2.0)], tmp_path / "o2", route="rank1", site="attn-out", progress=False)


@pytest.mark.slow
@pytest.mark.full  # a repeat on the embedded model of a CI-tier check on tiny models
def test_rank1_on_the_embedded_model_recovers_the_steering(smol_dir, smol_pirate, tmp_path):
    """Held-out prompts (not in the calibration set), pirate vector at layer 16, coef 2."""
    from helpers import HELD_OUT_SMOL, fidelity_on_smol

    assert not set(HELD_OUT_SMOL) & set(CALIBRATION_PROMPTS)
    v = smol_pirate
    out = bake("bias", smol_dir, [(v, 16, 2.0)], tmp_path / "out", route="rank1", progress=False)
    base, baked, tok = load_model(smol_dir), reload_strict(out), load_tokenizer(smol_dir)
    assert _keys(out) == _keys(smol_dir)
    f = fidelity_on_smol(base, baked, tok, lambda P: steer(base, v, 16, 2.0))
    fit = json.loads((out / "bakery.json").read_text())["extra"]["rank1_fit"]["16"]
    print(f"rank1 bake on SmolLM2 (bf16), layer 16 coef 2, vector {v.meta.get('variant')}: "
          f"{f.to_dict()} fit {fit}")
    assert f.recovered >= 0.95


HELD_OUT_MORE = HELD_OUT_TINY + ["Describe a quiet morning in the mountains.", "Why do cats sleep so much?",
                           "What should I name my new boat?", "Explain how a bicycle stays upright."]


def _response_fidelity(src, bakes: dict, v, layer, coef):
    """Fidelity of reloaded bakes to steering at answer tokens only (the prompt spared), all
    scored on the same sampled answers."""
    base, tok = load_model(src), load_tokenizer(src)
    ctx = lambda P: steer(base, v, layer, coef, positions="response", prompt_len=P)
    traj = sample_trajectories(base, tok, [render_chat(tok, q) for q in HELD_OUT_MORE], ctx,
                               max_new_tokens=16, batch_size=8)
    return measure(traj, model_scorer(base, ctx), model_scorer(base),
                   {name: model_scorer(reload_strict(out)) for name, out in bakes.items()})


@torch.no_grad()
def _prompt_drift(src, out):
    """Mean KL(base || bake) over the held-out prompts' own tokens, where steering that spares the
    prompt leaves the model as it was (no sampling)."""
    base, baked, tok = load_model(src), reload_strict(out), load_tokenizer(src)
    enc = encode_prompts(tok, [render_chat(tok, q) for q in HELD_OUT_MORE])
    b = torch.log_softmax(base(**enc).logits.float(), -1)
    c = torch.log_softmax(baked(**enc).logits.float(), -1)
    return float((b.exp() * (b - c)).sum(-1)[enc["attention_mask"].bool()].mean())


def test_rank1_gated_to_answer_tokens_stands_for_response_steering(tiny_models, tmp_path):
    """--positions response: u . a is fitted to 1 on answers and 0 on prompts; against steering
    that spares the prompt, the gated edit beats the ungated one."""
    # a 256-wide MLP, so that a linear gate can tell answers from prompts (the default 64 gets
    # u . a about 0.45 on answers and 0.19 on prompts, and gated and plain then score alike); and a
    # write about the size of the residual stream (norm ~0.1): coef 3 on a raw random vector
    # swamps it ~100-fold, and every later block sees mostly v whichever tokens carry it
    src = tiny_models("llama", intermediate_size=256)
    v = vec(src, seed=4)
    v.vectors /= v.vectors.norm(dim=-1, keepdim=True)
    coef = 0.1
    gated = bake("bias", src, [(v, 2, coef)], tmp_path / "gated", route="rank1", positions="response",
                 progress=False)
    plain = bake("bias", src, [(v, 2, coef)], tmp_path / "plain", route="rank1", progress=False)
    m = json.loads((gated / "bakery.json").read_text())
    assert m["positions"] == "response" and json.loads((plain / "bakery.json").read_text())["positions"] == "all"
    fit = m["extra"]["rank1_fit"]["2"]
    # about 0.78 on answers and 0.13 on prompts (0.65 apart) over fresh calibration draws
    assert fit["fit_mean"] - fit["off_mean"] > 0.3, fit
    assert any("gated to response tokens" in n for n in m["extra"]["notes"])
    # the prompt: the gated edit leaves it near the base (KL 0.06-0.07 of the plain edit's)
    dg, dp = _prompt_drift(src, gated), _prompt_drift(src, plain)
    assert dg < 0.3 * dp, (dg, dp)
    # the answers, scored on the same samples: over fresh draws of answers, calibration and vector,
    # the gated edit's KL was 0.24-0.48 of the plain one's, and R 0.85-0.91
    f = _response_fidelity(src, {"gated": gated, "plain": plain}, v, 2, coef)
    g, p = f["gated"], f["plain"]
    assert g.recovered > p.recovered and g.recovered > 0.7, (g.to_dict(), p.to_dict())
    with pytest.raises(BakeError, match="--calibration generate"):
        bake("bias", src, [(v, 2, coef)], tmp_path / "x", route="rank1", positions="response",
             calibration="prompts", progress=False)


@pytest.mark.slow
@pytest.mark.full  # a repeat on the embedded model of a CI-tier check on tiny models
def test_rank1_gated_on_the_embedded_model_recovers_response_steering(smol_dir, smol_pirate, tmp_path):
    from helpers import HELD_OUT_SMOL, fidelity_on_smol

    v = smol_pirate
    out = bake("bias", smol_dir, [(v, 16, 2.0)], tmp_path / "out", route="rank1", positions="response",
               progress=False)
    base, baked, tok = load_model(smol_dir), reload_strict(out), load_tokenizer(smol_dir)
    f = fidelity_on_smol(base, baked, tok, lambda P: steer(base, v, 16, 2.0, positions="response", prompt_len=P))
    fit = json.loads((out / "bakery.json").read_text())["extra"]["rank1_fit"]["16"]
    print(f"gated rank1 on SmolLM2, layer 16 coef 2, prompts of {HELD_OUT_SMOL[:1]}...: {f.to_dict()} fit {fit}")
    assert fit["fit_mean"] > 0.9 and abs(fit["off_mean"]) < 0.1
    assert f.recovered >= 0.9


def test_the_truncated_calibration_model_loads_without_transformers_load_report(tiny_models, tmp_path):
    """The calibration model is truncated to the blocks the edit needs, on purpose: the bake says
    nothing of the later blocks' weights it leaves unread, though transformers reports a table of
    UNEXPECTED keys for the same load (shown first, so the check can see the report)."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    class Kept(logging.Handler):  # on the logger itself: what passes its filters, whatever propagates
        messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    kept, log = Kept(), logging.getLogger("transformers.modeling_utils")
    src = tiny_models("llama")
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # what a user sees (the suite runs at error)
    log.addHandler(kept)
    try:
        cfg = AutoConfig.from_pretrained(src)
        cfg.num_hidden_layers = 2
        AutoModelForCausalLM.from_pretrained(src, config=cfg)
        shown = [m for m in kept.messages if "LOAD REPORT" in m]
        kept.messages.clear()
        bake("bias", src, [(vec(src, seed=4), 2, 3.0)], tmp_path / "out", route="rank1", calibration="prompts",
             progress=False)
    finally:
        log.removeHandler(kept)
        hf_logging.set_verbosity(before)
    assert shown and "UNEXPECTED" in shown[0]
    assert not [m for m in kept.messages if "LOAD REPORT" in m], kept.messages
