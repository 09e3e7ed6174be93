"""Distilled bakers on mixture-of-experts models whose experts transformers 5.2x keeps as fused
3-D parameters (Qwen3-MoE, Qwen3.5-MoE, OLMoE, Mixtral, gpt-oss): kl-lora reaches them through
peft's ``target_parameters``, kl-full trains them, the export merges them into every expert's
weights (per-expert or fused checkpoint tensors alike), and the manifest names what did not train."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from bakery.arch import spec_for
from bakery.bakers import bake
from bakery.bakers.distill.targets import expert_parameters, full_parameters, lora_targets
from bakery.bakers.distill.errors import DistillError
from bakery.bakers.distill.lora import add_lora
from bakery.bakers.distill.train_config import TrainConfig
from bakery.io.names import TensorNames
from bakery.models import load_model
from helpers import vec
from helpers import held_out_fidelity
from tiny import MOE_TYPES

LAYER, COEF = 2, 2.0


def _tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _expert_downs(folder) -> dict[int, list[str]]:
    """Per block, the checkpoint tensors that hold the experts' down-projections."""
    cfg = json.loads((folder / "config.json").read_text())
    names = TensorNames(_tensors(folder).keys(), spec_for(cfg), cfg)
    return {b: [w.name for w in names.mlp_writers(b) if w.kind == "expert"] for b in range(cfg["num_hidden_layers"])}


def _bake(src, tmp_path, method="kl-lora", **kw):
    vf = tmp_path / "v.safetensors"
    vec(src, seed=28).save(vf)
    train = dict(rank=8, lr=5e-3) if method == "kl-lora" else dict(lr=1e-3)
    train.update(kw)
    return bake(method, str(src), [(str(vf), LAYER, COEF)], tmp_path / "out", num_prompts=40,
                samples_per_prompt=1, max_new_tokens=12, steps=20, val_prompts=6, val_every=10,
                positions="all", work_dir=str(tmp_path / "work"), progress=False, **train)


@pytest.mark.parametrize("arch", MOE_TYPES)
def test_kl_lora_trains_every_experts_down_projection_and_beats_the_unedited_model(arch, distilled):
    src, out, v = distilled(arch, "kl-lora")
    m = json.loads((out / "bakery.json").read_text())["extra"]
    assert m["target_parameters"] == ["mlp.experts.down_proj"] and m["experts"] == "down"
    gate_up = "mlp.experts.gate_up_proj"
    assert gate_up in m["not_trained"] and "mlp.experts.down_proj" not in m["not_trained"]
    a, b = _tensors(src), _tensors(out)
    assert a.keys() == b.keys()  # the checkpoint's own expert layout (per-expert or fused) is kept
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    downs = _expert_downs(src)
    for blk, names in downs.items():  # every block's experts: LoRA trains all blocks
        assert names and set(names) <= changed, (blk, names)
    assert not any("gate_up" in k or ".w1." in k or ".w3." in k or "gate_proj" in k and "shared" not in k
                   for k in changed), sorted(changed)
    res = held_out_fidelity(src, out, v, LAYER, COEF)
    print(f"FIGURE {arch} kl-lora with expert LoRA: R {res.recovered:.3f} "
          f"(KL {res.kl:.5f} vs base {res.kl_base:.5f})")
    assert res.recovered > 0.0, res.to_dict()
    readme = (out / "README.md").read_text()
    assert "`mlp.experts.down_proj`" in readme and "Not trained (per block)" in readme


def test_the_expert_adapter_reloads_with_peft_onto_the_source(tiny_models, tmp_path):
    """adapter/ (peft target_parameters) on the source model gives the merged export's logits."""
    from peft import PeftModel

    src = tiny_models("mixtral")
    out = _bake(src, tmp_path, experts="all")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    ids = torch.randint(7, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = load_model(out)(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(load_model(src), str(out / "adapter"))(input_ids=ids).logits
        base = load_model(src)(input_ids=ids).logits
    assert (merged - base).abs().max() > 1e-3
    assert (adapted - merged).abs().max() < 1e-4


def test_experts_setting_picks_the_fused_weights(tiny_models):
    m = load_model(tiny_models("gpt_oss"))
    assert expert_parameters(m, "down") == ["mlp.experts.down_proj"]
    assert expert_parameters(m, "all") == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert expert_parameters(m, "none") == [] and expert_parameters(load_model(tiny_models("llama"))) == []
    t = lora_targets(m, None, "none").describe(m, lora=True)
    assert {"mlp.experts.down_proj", "mlp.experts.gate_up_proj", "self_attn.o_proj.bias"} <= set(t["not_trained"])
    with pytest.raises(DistillError, match="experts must be one of down, all, none"):
        TrainConfig(experts="gate").check()
    # full fine-tuning: the fused weights of blocks from first_block on, nothing before
    params = {id(p) for p in full_parameters(m, None, first_block=2, experts="down")}
    blocks = m.model.layers
    assert id(blocks[2].mlp.experts.down_proj) in params and id(blocks[3].mlp.experts.down_proj) in params
    assert id(blocks[1].mlp.experts.down_proj) not in params and id(blocks[2].mlp.experts.gate_up_proj) not in params
    assert id(blocks[2].mlp.experts.down_proj_bias) in params  # with the fused weight, as a linear's bias
    full = lora_targets(m, None, "down").describe(m, lora=False)["not_trained"]
    assert "mlp.experts.down_proj_bias" not in full and "mlp.experts.gate_up_proj_bias" in full
    # peft wraps the fused weights: trainable LoRA factors per expert, the base weight frozen
    pm = add_lora(load_model(tiny_models("qwen3_moe")), TrainConfig(rank=4, experts="down"))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("mlp.experts.lora_A" in n for n in trainable) and not any(n.endswith("down_proj") for n in trainable)


def test_kl_full_on_a_moe_model_trains_the_experts_from_the_warm_start(distilled):
    src, out, v = distilled("olmoe", "kl-full")  # top-k weights not normalised: the warm start divides by their sum
    m = json.loads((out / "bakery.json").read_text())["extra"]
    ws = m["warm_start"]
    assert ws["block"] == LAYER - 1 and ws["experts_fitted"] >= 1 and "skipped" not in ws
    assert any("one u per expert" in n for n in m["notes"])
    a, b = _tensors(src), _tensors(out)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    downs = _expert_downs(src)
    assert set(downs[LAYER - 1]) <= changed and set(downs[LAYER]) <= changed
    assert not set(downs[0]) & changed  # blocks before the steered one stay frozen
    res = held_out_fidelity(src, out, v, LAYER, COEF)
    print(f"FIGURE olmoe kl-full (warm start + experts): R {res.recovered:.3f}")
    assert res.recovered > 0.0, res.to_dict()
