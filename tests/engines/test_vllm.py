"""A real vLLM run (CPU build in .venv-vllm): vLLM loads the exact bias bake, a two-vector bias bake,
the broken bake, a weakened bake (bias x 0.95) and the base model of the embedded SmolLM2,
teacher-forced against transformers."""

from __future__ import annotations

import subprocess

import pytest
import torch

from bakery.engines.verify import verify
from bakery.engines.vllm import VLLM_GAP_RATIO, find_vllm_python
from bakery.models import load_model, load_tokenizer
from bakery.vectors.artifact import VectorArtifact
from helpers import make_bias_bake, real_bake, weakened_copy

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["How do I cook rice?", "Tell me about the sea.", "What makes a good friend?",
           "Describe a rainy afternoon."]


PLAIN = "Hello. Please find the requested information in the attached document below."
PIRATE = "Arr, matey! Ye scurvy dog, hoist the sails and splice the mainbrace, yo ho ho!"
EVIL = "I will crush you all. Your suffering amuses me, and I lie, cheat and destroy for fun."


def quick_vector(model_dir, text: str = PIRATE, trait: str = "pirate") -> VectorArtifact:
    """A contrastive direction from two texts (e.g. pirate talk minus plain talk), one forward each."""
    m, tok = load_model(model_dir), load_tokenizer(model_dir)
    texts = [text, PLAIN]
    means = []
    with torch.no_grad():
        for t in texts:
            hs = m(**tok(t, return_tensors="pt"), output_hidden_states=True).hidden_states
            means.append(torch.stack([h[0].mean(0) for h in hs]))
    return VectorArtifact(means[0] - means[1], {"trait": trait})


def test_vllm_keeps_the_exact_bakes_and_catches_the_broken_and_weakened_ones(smol_dir, tmp_path):
    from bakery.bakers import bake

    try:
        python = find_vllm_python()
    except Exception as e:
        pytest.fail(f"the vLLM test needs the vLLM CPU build: {e}")
    # the converted config has rope_parameters and no legacy rope_theta: vLLM's transformers reads it
    out = subprocess.run([str(python), "-c", "import sys; from transformers import AutoConfig; "
                          "print(AutoConfig.from_pretrained(sys.argv[1]).rope_parameters['rope_theta'])",
                          str(smol_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and float(out.stdout.strip()) == 100000.0, out.stderr[-2000:]

    vec = quick_vector(smol_dir)
    exact = real_bake("bias", smol_dir, vec, 16, 1.0, tmp_path / "exact")
    broken = make_bias_bake(smol_dir, vec, 16, 1.0, tmp_path / "broken", broken=True)
    weak = weakened_copy(exact, tmp_path / "weak", 0.95)
    evil = quick_vector(smol_dir, EVIL, "evil")
    two = bake("bias", smol_dir, [(vec.save(tmp_path / "pirate.safetensors"), 14, 1.0),
                                  (evil.save(tmp_path / "evil.safetensors"), 18, 1.0)], tmp_path / "two",
               progress=False)
    res = verify([exact, broken, weak, two], "vllm", prompts=PROMPTS, max_new_tokens=32, write=False)
    (good,), (bad,), (weak_v,), (two_v,) = (res[str(e)] for e in (exact, broken, weak, two))

    d = good.details
    assert good.status == "pass", good.message
    assert d["bake_vs_steered"]["top1"] >= 0.99
    unedited = d["unedited_vs_target"]["mean_abs_logprob_gap"]
    assert unedited > 0.1  # the edit matters, so keeping it is a real test
    assert d["gap_ratio"] < VLLM_GAP_RATIO / 4
    # noise floor: the untouched model in vLLM vs transformers (float32), rope theta included
    floor = d["noise_floor_base_vllm_vs_transformers"]
    assert floor["top1"] >= 0.99 and floor["mean_abs_logprob_gap"] < 0.01

    assert bad.status == "fail"
    assert "vLLM lost the edit" in bad.message and "mlp_bias: true" in bad.message
    assert bad.details["bake_vs_base_in_vllm"]["mean_abs_logprob_gap"] < 0.1 * unedited

    # the edit survives but is 5% too small (transformers fails it too: test_engines.py)
    assert weak_v.status == "fail" and "more than allowed" in weak_v.message, weak_v.message
    assert weak_v.details["gap_ratio"] > VLLM_GAP_RATIO
    # vLLM runs the weakened weights faithfully: it matches the weakened bake in transformers
    assert weak_v.details["bake_vs_transformers_bake"]["mean_abs_logprob_gap"] < 0.01

    # two vectors at two layers: the reference steers with both (transformers: test_engines.py)
    assert two_v.details["target"] == "transformers runtime steering"
    assert two_v.status == "pass" and two_v.details["gap_ratio"] < VLLM_GAP_RATIO / 4, two_v.message


@pytest.mark.full  # a second vLLM process; CI's vLLM run is the test above
def test_vllm_teacher_samples_the_steered_distribution(smol_dir, smol_pirate, tmp_path):
    """--teacher-engine vllm: trajectories sampled from the exact bias bake in vLLM are as likely
    under runtime steering (positions=all) as hooked transformers samples, and far likelier than
    under the unsteered model; prompts are the rendered chat, finished responses end with EOS; the
    top-k kept from vLLM's sampling (--teacher-topk) is the runtime-steered teacher's distribution."""
    from bakery.bakers.api import prepare
    from bakery.bakers.distill.pipeline import prepare as prepare_run, sample_from_bias_bake
    from bakery.bakers.distilled import teacher_bias_bake
    from bakery.bakers.distill.losses import kl_per_token, kl_topk
    from bakery.bakers.distill.trajectories import collate, collate_topk
    from bakery.fidelity.metrics import model_scorer
    from bakery.steering.generation import eos_token_ids, render_chat
    from bakery.steering.hooks import steer
    from bakery.bakers.distill.trajectories import mean_logprob, sample
    m, tok = load_model(smol_dir), load_tokenizer(smol_dir)
    vec = smol_pirate
    job = prepare("kl-lora", str(smol_dir), [(vec, 16, 2.0, "pirate")], tmp_path / "out", positions="all",
                  max_new_tokens=40, samples_per_prompt=2, teacher_engine="vllm", teacher_topk=8,
                  work_dir=str(tmp_path / "work"))
    ts = sample_from_bias_bake(prepare_run(job), teacher_bias_bake(job.model_dir), PROMPTS)
    assert len(ts) == 2 * len(PROMPTS) and ts.meta["teacher_engine"] == "vllm" and ts.meta["layer"] == 16
    for t in ts.items:
        assert t.prompt_ids == tok(render_chat(tok, t.prompt), add_special_tokens=False)["input_ids"]
    eos = set(eos_token_ids(m, tok))
    finished = [t for t in ts.items if len(t.response_ids) < 40]
    assert all(t.response_ids[-1] in eos for t in finished)
    assert all(tok.eos_token_id not in t.response_ids[:-1] for t in ts.items)

    steered = model_scorer(m, lambda P: steer(m, vec, 16, 2.0, positions="all"))
    base = model_scorer(m)
    ref = sample(m, tok, PROMPTS, lambda P: steer(m, vec, 16, 2.0, positions="all"), samples_per_prompt=2,
                 max_new_tokens=40, seed=1, progress=False)
    lp_vllm, lp_tf = mean_logprob(ts, steered, tok.pad_token_id), mean_logprob(ref, steered, tok.pad_token_id)
    assert mean_logprob(ts, base, tok.pad_token_id) < lp_vllm - 0.3
    assert abs(lp_vllm - lp_tf) < 0.5, (lp_vllm, lp_tf)

    # the kept top-8 against the runtime-steered teacher's top-8, teacher-forced in transformers
    assert ts.meta["teacher_topk"] == 8
    ids, mask, P = collate(ts.items, tok.pad_token_id)
    with torch.no_grad(), steer(m, vec, 16, 2.0, positions="all"):
        logits = m(input_ids=ids, attention_mask=mask).logits
    teacher = torch.log_softmax(logits[:, P - 1:-1][mask[:, P:].bool()].float(), -1)
    kept_ids, kept_lp = collate_topk(ts.items)
    assert kept_ids.shape == (teacher.shape[0], 8)
    assert (kept_ids[:, 0] == teacher.argmax(-1)).float().mean() > 0.99
    assert (kept_lp - teacher.gather(1, kept_ids)).abs().max() < 0.02
    # training on the kept top-k: the steered model itself has (almost) nothing left to learn,
    # the unsteered one has
    with torch.no_grad():
        plain = torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1][mask[:, P:].bool()].float(), -1)
    assert kl_topk(kept_ids, kept_lp, teacher).mean() < 2e-3
    # the unsteered one's loss is the one transformers' own top-8 would give (the coarse-grained KL
    # is a lower bound of the exact one, so its size relative to the exact KL depends on the samples)
    own_lp, own_ids = teacher.topk(8, -1)
    from_vllm, from_tf = kl_topk(kept_ids, kept_lp, plain).mean(), kl_topk(own_ids, own_lp, plain).mean()
    assert from_vllm > 0.1 and abs(from_vllm - from_tf) < 0.05 * from_tf, (from_vllm, from_tf)
    assert from_vllm <= kl_per_token(teacher, plain).mean() + 1e-3
