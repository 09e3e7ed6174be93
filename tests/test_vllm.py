"""A real vLLM run (CPU build in .venv-vllm): vLLM loads the exact bias bake, the
broken bake and the base model of the embedded SmolLM2, teacher-forced against transformers."""

from __future__ import annotations

import subprocess

import pytest
import torch

from bakery.engines import find_vllm_python, verify
from bakery.models import load_model, load_tokenizer
from bakery.vectors import VectorArtifact
from test_compare import make_bias_bake, real_bake

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["How do I cook rice?", "Tell me about the sea.", "What makes a good friend?",
           "Describe a rainy afternoon."]


def quick_vector(model_dir) -> VectorArtifact:
    """A contrastive direction from two texts (pirate talk minus plain talk), one forward each."""
    m, tok = load_model(model_dir), load_tokenizer(model_dir)
    texts = ["Arr, matey! Ye scurvy dog, hoist the sails and splice the mainbrace, yo ho ho!",
             "Hello. Please find the requested information in the attached document below."]
    means = []
    with torch.no_grad():
        for t in texts:
            hs = m(**tok(t, return_tensors="pt"), output_hidden_states=True).hidden_states
            means.append(torch.stack([h[0].mean(0) for h in hs]))
    return VectorArtifact(means[0] - means[1], {"trait": "pirate"})


def test_vllm_keeps_the_exact_bake_and_catches_the_broken_one(smol_dir, tmp_path):
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
    res = verify([exact, broken], "vllm", prompts=PROMPTS, max_new_tokens=32, write=False)
    (good,), (bad,) = res[str(exact)], res[str(broken)]

    d = good.details
    assert good.status == "pass", good.message
    assert d["bake_vs_steered"]["top1"] >= 0.99
    unedited = d["unedited_vs_target"]["mean_abs_logprob_gap"]
    assert unedited > 0.1  # the edit matters, so keeping it is a real test
    assert d["bake_vs_steered"]["mean_abs_logprob_gap"] < 0.1 * unedited
    # noise floor: the untouched model in vLLM vs transformers (float32), rope theta included
    floor = d["noise_floor_base_vllm_vs_transformers"]
    assert floor["top1"] >= 0.99 and floor["mean_abs_logprob_gap"] < 0.01

    assert bad.status == "fail"
    assert "vLLM lost the edit" in bad.message and "mlp_bias: true" in bad.message
    assert bad.details["bake_vs_base_in_vllm"]["mean_abs_logprob_gap"] < 0.1 * unedited
