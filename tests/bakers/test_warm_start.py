"""kl-full's closed-form warm start: a gated rank-one write of ``coef * v`` into the steered
block's down-projection, fitted on the training trajectories."""

from __future__ import annotations

import pytest
import torch

from bakery.bakers.api import prepare
from bakery.bakers.distilled import train as train_distilled
from bakery.models import load_model, load_tokenizer
from bakery.steering.hooks import steer
from bakery.bakers.distill.prompts import prompt_pool
from bakery.bakers.distill.trajectories import collate, sample
from bakery.vectors.artifact import VectorArtifact
from bakery.bakers.gate_fit import steered_positions
from bakery.bakers.distill.warm_start import apply_warm_start, fit_write
from bakery.arch import spec_for
from bakery.bakers.rank1 import down_module
from tiny import MOE_TYPES

LAYER, COEF = 2, 4.0
# a shared part of every embedding: the residual then has the nearly constant direction of trained
# models that drives the neuron gate
OFFSET = 1.0


def _trajectories(folder, vec, positions, n=24):
    m, tok = load_model(folder), load_tokenizer(folder)
    ctx = lambda P: steer(m, vec, LAYER, COEF, positions=positions, prompt_len=P)
    return sample(m, tok, prompt_pool(n, seed=3), ctx, max_new_tokens=8, batch_size=12, progress=False), tok


def _along(diff: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each row's coefficient along ``v``, once every row of ``diff`` is checked to move along
    ``v`` only."""
    lam = diff @ v / v.dot(v)
    assert (diff - lam[:, None] * v).norm() < 1e-4 * diff.norm()
    return lam


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2: Conv1D stores [in, out]
def test_the_write_is_coef_v_times_the_gate_at_the_steered_block(tiny_models, model_type):
    folder = tiny_models(model_type)
    torch.manual_seed(0)
    vec = VectorArtifact(torch.randn(5, 32), {"trait": "rand"})
    ts, tok = _trajectories(folder, vec, "response")
    base, edited = load_model(folder), load_model(folder)
    args = dict(vector=vec.row(LAYER), layer=LAYER, coef=COEF, positions="response", gate="linear")
    gate = fit_write(base, ts.items, tok.pad_token_id, **args).stats
    info = apply_warm_start(edited, ts.items, tok.pad_token_id, **args)
    assert info["block"] == LAYER - 1 and info["tokens"] == gate["rows"] and info["gate"] == "linear"
    ids, mask, P = collate(ts.items[:8], tok.pad_token_id)
    with torch.no_grad():
        h0 = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h1 = edited(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    keep = mask.bool()
    assert torch.equal(h0[LAYER - 1][keep], h1[LAYER - 1][keep])  # earlier blocks untouched
    diff = (h1[LAYER] - h0[LAYER])[keep]
    lam = _along(diff, vec.row(LAYER).float())  # every position moves along v only
    # by coef * (u . a): more where the teacher steers than where it does not (a random tiny model
    # separates them weakly; the embedded model's test below asks for a sharp gate)
    on = steered_positions(mask, P, "response")[keep].bool()
    assert lam[on].mean() / COEF == pytest.approx(gate["on_mean"], abs=0.15)
    assert lam[on].mean() - lam[~on].mean() > 0.2 * COEF, (lam[on].mean(), lam[~on].mean())


def _mlp_io(model, block: int, ids, mask) -> dict:
    """Block ``block``'s MLP output ``y`` and its down-projection's input ``a``."""
    spec = spec_for(model.config)
    mod = model.get_submodule(spec.blocks)[block]
    mlp = mod.get_submodule(down_module(spec, mod).rsplit(".", 1)[0])
    got = {}
    hooks = [mlp.register_forward_hook(lambda m, a, o: got.setdefault("y", o)),
             mlp.down_proj.register_forward_pre_hook(lambda m, a: got.setdefault("a", a[0]))]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return got


def _check_neuron_write(base, edited, info, ts, tok, vec) -> None:
    """Block L-1's MLP lost neuron j's old write and gained ``coef * v * gate``: nothing else moved."""
    j, block = info["neuron"], LAYER - 1
    src, got = dict(base.named_parameters()), dict(edited.named_parameters())
    moved = sorted(n for n in src if not torch.equal(src[n], got[n]))
    mlp = [n.rsplit(".", 2)[0] for n in moved if n.endswith("down_proj.weight")]
    assert mlp and moved == [f"{mlp[0]}.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj")], moved
    for p in ("gate_proj", "up_proj"):  # only the repurposed neuron's row
        rows = (src[f"{mlp[0]}.{p}.weight"] != got[f"{mlp[0]}.{p}.weight"]).any(1).nonzero().flatten().tolist()
        assert rows == [j], (p, rows)
    ids, mask, P = collate(ts.items[:8], tok.pad_token_id)
    before, after = _mlp_io(base, block, ids, mask), _mlp_io(edited, block, ids, mask)
    old = (before["a"][..., j:j + 1] * src[f"{mlp[0]}.down_proj.weight"][:, j]).detach()  # neuron j's old write
    keep = mask.bool()
    diff = (after["y"] - before["y"] + old)[keep]
    lam = _along(diff, vec.row(LAYER).float())  # the rest moves along v only
    on = steered_positions(mask, P, "response")[keep].bool()
    assert lam[on].mean() / COEF == pytest.approx(info["steered_mean"], abs=0.15)
    assert lam[on].mean() - lam[~on].mean() > 0.1 * COEF, (lam[on].mean(), lam[~on].mean())


def test_the_neuron_gate_repurposes_one_neuron_and_writes_along_v(tiny_models):
    """The neuron gate (that it gates better than the linear one is the embedded model's test
    below: a random tiny model separates answers from prompts weakly either way)."""
    folder = tiny_models("llama", intermediate_size=256, residual_offset=OFFSET)
    torch.manual_seed(0)
    vec = VectorArtifact(torch.randn(5, 32), {"trait": "rand"})
    ts, tok = _trajectories(folder, vec, "response")
    base, edited = load_model(folder), load_model(folder)
    args = dict(vector=vec.row(LAYER), layer=LAYER, coef=COEF, positions="response")
    info = apply_warm_start(edited, ts.items, tok.pad_token_id, gate="neuron", **args)
    assert info["gate"] == "neuron" and "neuron_gate" not in info
    _check_neuron_write(base, edited, info, ts, tok, vec)
    with pytest.raises(ValueError, match="no neuron gate"):  # gpt2: no gated MLP
        gpt2 = tiny_models("gpt2")
        ts2, tok2 = _trajectories(gpt2, vec, "response")
        apply_warm_start(load_model(gpt2), ts2.items, tok2.pad_token_id, gate="neuron", **args)


# gated MLPs with separate bias-free gate and up projections; the others fall back to the linear gate
NEURON_GATED = {"llama", "mistral", "qwen2", "qwen3", "granite", "qwen3_5_text"}


def test_which_architectures_get_the_neuron_gate(tiny_models, arch_type):
    """``auto`` on every architecture: the neuron gate on the gated MLPs (its write checked as on
    Llama), the linear gate elsewhere with the reason, per-expert gates on MoE blocks, nothing on
    sandwich-norm blocks."""
    folder = tiny_models(arch_type, residual_offset=OFFSET)
    torch.manual_seed(0)
    vec = VectorArtifact(torch.randn(5, 32), {"trait": "rand"})
    ts, tok = _trajectories(folder, vec, "response")
    base, edited = load_model(folder), load_model(folder)
    info = apply_warm_start(edited, ts.items, tok.pad_token_id, vector=vec.row(LAYER), layer=LAYER, coef=COEF,
                            positions="response")
    spec = spec_for(base.config)
    if spec.sandwich:
        assert "sandwich" in info["skipped"]
    elif "experts" in info:
        assert arch_type in MOE_TYPES and "gate" not in info
    elif arch_type in NEURON_GATED:
        assert info["gate"] == "neuron", info
        _check_neuron_write(base, edited, info, ts, tok, vec)
    else:
        assert info["gate"] == "linear" and "not a gated one" in info["neuron_gate"], info


@pytest.mark.parametrize("method,positions", [("kl-full", "response"), ("kl-full", "all"), ("kl-lora", "response")])
def test_a_warm_start_begins_closer_to_the_teacher(tiny_models, tmp_path, method, positions):
    """kl-full writes it into the weight, kl-lora (asked for) into one LoRA component."""
    # a 256-wide MLP: with the default 64 a linear gate barely tells answers from prompts (u . a
    # about 0.33 on answers), and the response ratio below came out 0.27-0.46 over fresh draws of
    # vector, prompts and samples; at 256 it is 0.09-0.22 (all: under 0.05), and 1 with no write
    folder = tiny_models("llama", intermediate_size=256, residual_offset=OFFSET)
    torch.manual_seed(1)
    vec_file = tmp_path / "v.safetensors"
    VectorArtifact(torch.randn(5, 32), {"trait": "rand"}).save(vec_file)
    kl0, info = {}, {}
    for warm in (True, False):
        req = prepare(method, str(folder), [(str(vec_file), LAYER, COEF)], tmp_path / f"out-{warm}",
                      positions=positions, num_prompts=44, samples_per_prompt=1, max_new_tokens=10, val_prompts=8,
                      sample_batch_size=22, trajectories=str(tmp_path / "t.jsonl"), dtype="float32", steps=1,
                      val_every=1, checkpoint_every=0, warm_start=warm, lr=1e-9,
                      **({"rank": 8} if method == "kl-lora" else {}))
        res = train_distilled(req, progress=False)
        kl0[warm], info[warm] = res.result.history[0]["val_kl"], res.info
    ws = info[True]["warm_start"]
    assert ws["block"] == LAYER - 1 and ws["tokens"] > 100 and info[False].get("warm_start") is None
    assert ("lora_components" in ws) == (method == "kl-lora") and ws["gate"] == "neuron"
    assert kl0[True] < 0.5 * kl0[False], kl0
    # R is measured against the unedited model in both cases, and the manifest says so
    assert ws["source_val_kl"] == pytest.approx(kl0[False], rel=1e-4)
    assert info[True]["val_kl_base"] == pytest.approx(kl0[False], rel=1e-4)
    assert info[True]["val_R"] >= 1 - kl0[True] / kl0[False] - 1e-3
    assert "warm start" in info[True]["notes"][0]


@pytest.mark.slow
@pytest.mark.full  # a repeat on the embedded model of a CI-tier check on tiny models
def test_on_the_embedded_model_the_warm_start_alone_recovers_response_steering(smol_dir, smol_pirate):
    """The gated write, before any training, on questions it was not fitted on: the neuron gate
    recovers more than the linear one."""
    from bakery.fidelity.metrics import measure, model_scorer
    from bakery.bakers.distill.trajectories import to_fidelity
    m, tok = load_model(smol_dir), load_tokenizer(smol_dir)
    vec = smol_pirate
    layer, coef = 16, 2.0
    ctx = lambda P: steer(m, vec, layer, coef, positions="response", prompt_len=P)
    fit_on = sample(m, tok, prompt_pool(48, seed=5), ctx, max_new_tokens=24, batch_size=16, progress=False)
    held = sample(m, tok, ["How do I bake bread?", "Why do people keep pets?", "How does a car engine work?",
                           "What makes a good friend?", "How should I plan a holiday?", "Explain how plants grow."],
                  ctx, max_new_tokens=24, batch_size=6, seed=99, progress=False)
    students, info = {}, {}
    for gate in ("linear", "neuron"):
        students[gate] = load_model(smol_dir)
        info[gate] = apply_warm_start(students[gate], fit_on.items, tok.pad_token_id, vector=vec.row(layer),
                                      layer=layer, coef=coef, positions="response", gate=gate)
    traj = to_fidelity(held, tok.pad_token_id, batch_size=6)
    f = measure(traj, model_scorer(m, ctx), model_scorer(m), {g: model_scorer(s) for g, s in students.items()})
    for gate in info:
        assert info[gate]["steered_mean"] > 0.8 and abs(info[gate]["unsteered_mean"]) < 0.2, info
    assert f["linear"].recovered > 0.85, f
    assert f["neuron"].recovered > f["linear"].recovered, f


def test_a_sandwich_norm_model_trains_from_the_source_weights_and_says_so(tiny_models, tmp_path):
    """Gemma-2 renormalises the MLP output: no plain rank-one write, so no warm start, and the
    learning rate is the one for training from the source weights."""
    folder = tiny_models("gemma2")
    vec_file = tmp_path / "v.safetensors"
    VectorArtifact(torch.randn(5, 32, generator=torch.Generator().manual_seed(2)), {"trait": "rand"}).save(vec_file)
    req = prepare("kl-full", str(folder), [(str(vec_file), LAYER, COEF)], tmp_path / "out", num_prompts=30,
                  samples_per_prompt=1, max_new_tokens=6, val_prompts=6, sample_batch_size=15, dtype="float32",
                  steps=2, val_every=1, checkpoint_every=0)
    res = train_distilled(req, progress=False)
    assert "sandwich" in res.info["warm_start"]["skipped"] and res.info["lr"] == 5e-5
    assert res.info["notes"][0].startswith("no warm start: sandwich-norm")


@pytest.mark.parametrize("model_type,width", [("qwen3_moe", "moe_intermediate_size"),
                                               ("gpt_oss", "intermediate_size")])  # gpt-oss: transposed, biased experts
def test_on_a_moe_block_every_expert_gets_the_gated_write(tiny_models, model_type, width):
    """The write goes through every expert the trajectories reach: earlier blocks are untouched,
    the steered block's output moves along v only, by coef times the fitted gate (the routed sum
    of the experts' u . a); 64-wide experts fit u . a = 1 well (16-wide ones: about 0.6)."""
    from bakery.bakers.distill.warm_start import fit_expert_gates

    folder = tiny_models(model_type, **{width: 64})
    torch.manual_seed(0)
    vec = VectorArtifact(torch.randn(5, 32), {"trait": "rand"})
    ts, tok = _trajectories(folder, vec, "all")
    base, edited = load_model(folder), load_model(folder)
    gates = fit_expert_gates(base, ts.items, tok.pad_token_id, LAYER - 1, "all")
    info = apply_warm_start(edited, ts.items, tok.pad_token_id, vector=vec.row(LAYER), layer=LAYER,
                            coef=COEF, positions="all")
    assert info["block"] == LAYER - 1 and info["experts"] == 4
    assert info["experts_fitted"] == len(gates["u_experts"]) >= 2
    W0, W1 = (m.model.layers[LAYER - 1].mlp.experts.down_proj for m in (base, edited))
    # the experts the trajectories reached are edited, any other is left as it was
    assert {e for e in range(4) if not torch.equal(W0[e], W1[e])} == set(gates["u_experts"])
    ids, mask, P = collate(ts.items[:8], tok.pad_token_id)
    with torch.no_grad():
        h0 = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        h1 = edited(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    keep = mask.bool()
    assert torch.equal(h0[LAYER - 1][keep], h1[LAYER - 1][keep])
    diff = (h1[LAYER] - h0[LAYER])[keep]
    v = vec.row(LAYER).float()
    lam = diff @ v / v.dot(v)
    assert (diff - lam[:, None] * v).norm() < 1e-4 * diff.norm()
    print(f"FIGURE {model_type} MoE warm start: realised gate {float(lam.mean()) / COEF:.3f}, "
          f"fitted {info['steered_mean']:.3f}")
    assert float(lam.mean()) / COEF == pytest.approx(info["steered_mean"], abs=0.05)
    assert info["steered_mean"] > 0.8


def test_kl_full_on_a_moe_model_starts_closer_to_the_teacher(tiny_models, tmp_path):
    folder = tiny_models("mixtral")
    vec_file = tmp_path / "v.safetensors"
    VectorArtifact(torch.randn(5, 32, generator=torch.Generator().manual_seed(4)), {"trait": "rand"}).save(vec_file)
    kl0, info = {}, {}
    for warm in (True, False):
        req = prepare("kl-full", str(folder), [(str(vec_file), LAYER, COEF)], tmp_path / f"out-{warm}",
                      positions="all", num_prompts=40, samples_per_prompt=1, max_new_tokens=8, val_prompts=8,
                      sample_batch_size=20, trajectories=str(tmp_path / "t.jsonl"), dtype="float32", steps=1,
                      val_every=1, checkpoint_every=0, warm_start=warm, lr=1e-9)
        res = train_distilled(req, progress=False)
        kl0[warm], info[warm] = res.result.history[0]["val_kl"], res.info
    print(f"FIGURE mixtral MoE warm start: step-0 val KL {kl0[True]:.5f} vs {kl0[False]:.5f} from the source")
    assert kl0[True] < 0.7 * kl0[False], kl0
    assert info[True]["warm_start"]["experts_fitted"] >= 1 and "one u per expert" in info[True]["notes"][0]
