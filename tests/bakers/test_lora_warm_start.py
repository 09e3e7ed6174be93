"""kl-lora's warm start: the gated rank-one write of kl-full's warm start, held by one component
of the LoRA on the steered block's down-projection."""

from __future__ import annotations

import pytest
import torch

from bakery.arch import spec_for
from bakery.bakers.distill.lora import add_lora
from bakery.bakers.distill.train_config import TrainConfig
from bakery.bakers.distill.prompts import prompt_pool
from bakery.bakers.distill.trajectories import collate, sample
from bakery.bakers.distill.warm_start import apply_lora_warm_start, apply_warm_start
from bakery.bakers.rank1 import down_module
from bakery.models import load_model, load_tokenizer
from bakery.steering.hooks import steer
from bakery.vectors.artifact import VectorArtifact

LAYER, COEF = 2, 4.0
# a shared part of every embedding: the residual then has the nearly constant direction of trained
# models that drives the neuron gate
OFFSET = 1.0


def _setup(folder, seed=0):
    torch.manual_seed(seed)
    vec = VectorArtifact(torch.randn(5, 32), {"trait": "rand"})
    m, tok = load_model(folder), load_tokenizer(folder)
    ctx = lambda P: steer(m, vec, LAYER, COEF, positions="response", prompt_len=P)
    ts = sample(m, tok, prompt_pool(24, seed=3), ctx, max_new_tokens=8, batch_size=12, progress=False)
    return vec, ts, tok


def _down_weight(model, block):
    spec = spec_for(model.config)
    mod = model.get_submodule(spec.blocks)[block]
    return mod.get_submodule(down_module(spec, mod)).weight


@pytest.mark.parametrize("model_type,gate", [("llama", "neuron"), ("llama", "linear"), ("gpt2", "linear")])
def test_the_lora_warm_start_is_the_kl_full_warm_start(tiny_models, model_type, gate):
    """gpt2: Conv1D, peft's fan_in_fan_out, and no gated MLP: auto falls back to the linear gate."""
    folder = tiny_models(model_type, residual_offset=OFFSET)
    vec, ts, tok = _setup(folder)
    args = dict(vector=vec.row(LAYER), layer=LAYER, coef=COEF, positions="response",
                gate="auto" if model_type == "gpt2" else gate)
    full = load_model(folder)
    info_full = apply_warm_start(full, ts.items, tok.pad_token_id, **args)
    lora = add_lora(load_model(folder), TrainConfig(rank=8))
    info = apply_lora_warm_start(lora, ts.items, tok.pad_token_id, **args)
    assert info["block"] == LAYER - 1 and info["gate"] == info_full["gate"] == gate
    assert info["lora_components"] == ({"mlp.gate_proj": 1, "mlp.up_proj": 1, "mlp.down_proj": 2}
                                       if gate == "neuron" else {down_module(spec_for(full.config), None): 1})
    if model_type == "gpt2":
        assert "not a gated one" in info["neuron_gate"]
    for k in ("tokens", "steered_mean", "unsteered_mean", "rmse"):  # the same fit
        assert info[k] == pytest.approx(info_full[k], abs=1e-4), k
    ids, mask, P = collate(ts.items[:8], tok.pad_token_id)
    keep = mask.bool()
    with torch.no_grad():
        a = full(input_ids=ids, attention_mask=mask).logits[keep]
        b = lora(input_ids=ids, attention_mask=mask).logits[keep]
    assert (a - b).abs().max() < 1e-4 * a.abs().max(), (a - b).abs().max()
    # the adapter holds exactly the edits: merged, it equals kl-full's edited weights, and only
    # the steered block's MLP moved
    source = load_model(folder)
    merged = lora.merge_and_unload()
    src, got, want = dict(source.named_parameters()), dict(merged.named_parameters()), dict(full.named_parameters())
    assert src.keys() == got.keys()
    for n in src:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-5)
    moved = [n for n in src if not torch.allclose(src[n], got[n], atol=1e-6)]
    assert len(moved) == (3 if gate == "neuron" else 1), moved
    if gate == "linear":
        target = _down_weight(source, LAYER - 1)
        delta = (_down_weight(merged, LAYER - 1) - target).detach()
        assert torch.linalg.matrix_rank(delta.double(), atol=1e-4 * float(delta.abs().max())) == 1
        v = vec.row(LAYER).float()
        along = delta.T if spec_for(source.config).conv1d else delta  # [out, in]
        col = along[:, along.norm(dim=0).argmax()]  # every column is a multiple of v
        assert abs(float(col @ v) / float(col.norm() * v.norm())) == pytest.approx(1.0, abs=1e-5)


def test_the_warm_started_adapter_trains_from_balanced_factors(tiny_models):
    folder = tiny_models("llama")
    vec, ts, tok = _setup(folder, seed=1)
    lora = add_lora(load_model(folder), TrainConfig(rank=4))
    apply_lora_warm_start(lora, ts.items, tok.pad_token_id, vector=vec.row(LAYER), layer=LAYER, coef=COEF,
                          positions="response", gate="linear")
    mod = lora.get_base_model().model.layers[LAYER - 1].mlp.down_proj
    A, B = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
    assert B[:, 1:].abs().max() == 0 and B[:, 0].norm() == pytest.approx(float(A[0].norm()), rel=1e-5)
    assert A[1:].abs().max() > 0  # the other components keep peft's random A (B zero: they add nothing yet)
    with pytest.raises(ValueError, match="fresh adapter"):
        apply_lora_warm_start(lora, ts.items, tok.pad_token_id, vector=vec.row(LAYER), layer=LAYER, coef=COEF,
                              positions="response")


def test_skipped_where_no_lora_down_projection_holds_the_write(tiny_models):
    folder = tiny_models("llama")
    vec, ts, tok = _setup(folder, seed=2)
    lora = add_lora(load_model(folder), TrainConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    info = apply_lora_warm_start(lora, ts.items, tok.pad_token_id, vector=vec.row(LAYER), layer=LAYER, coef=COEF,
                                 positions="response")
    assert "does not train" in info["skipped"]
    moe = tiny_models("qwen3_moe")
    vec, ts, tok = _setup(moe, seed=2)
    lora = add_lora(load_model(moe), TrainConfig(rank=4))
    info = apply_lora_warm_start(lora, ts.items, tok.pad_token_id, vector=vec.row(LAYER), layer=LAYER, coef=COEF,
                                 positions="response")
    assert "mixture-of-experts" in info["skipped"]
    # rank 1 holds no neuron gate (the down-projection needs two components): the linear one, saying why
    lora = add_lora(load_model(folder), TrainConfig(rank=1))
    vec, ts, tok = _setup(folder, seed=2)
    info = apply_lora_warm_start(lora, ts.items, tok.pad_token_id, vector=vec.row(LAYER), layer=LAYER, coef=COEF,
                                 positions="response")
    assert info["gate"] == "linear" and "rank 2" in info["neuron_gate"]
