"""A real sglang run (0.5.23 on the CPU, in .venv-sglang from `make sglang`): tiny Llama bakes
loaded with sglang's native model class and with its Transformers backend, teacher-forced against
transformers steering. One `bakery verify` call starts every engine (about 25-50 s each), so the
checks are grouped."""

from __future__ import annotations

import json
import subprocess

import pytest
from click.testing import CliRunner

from bakery.cli import main
from bakery.engines.sglang import FLAG, STUB, find_sglang_python
from bakery.engines.vllm import VLLM_GAP_RATIO
from helpers import random_vector, real_bake, weakened_copy

pytestmark = [pytest.mark.slow, pytest.mark.sglang]

PROMPTS = ["hello sea", "the quick fox", "tell me about ships"]


@pytest.fixture(scope="module")
def sglang_python():
    try:
        return find_sglang_python()
    except Exception as e:
        pytest.fail(f"the sglang tests need sglang's venv: {e}")


def test_sglang_runs_mlp_bias_only_with_the_flag_attn_out_natively_and_fails_a_weakened_bake(
        sglang_python, tiny_models, tmp_path):
    d = tiny_models("llama")
    vec = random_vector(d, scale=0.1)
    mlp = real_bake("bias", d, vec, 2, 3.0, tmp_path / "mlp")
    attn = real_bake("bias", d, random_vector(d, seed=5, scale=0.1), 2, 3.0, tmp_path / "attn", site="attn-out")
    weak = weakened_copy(mlp, tmp_path / "weak", 0.95)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    r = CliRunner().invoke(main, ["verify", str(mlp), str(attn), str(weak), "--engine", "sglang", "--json",
                                  "--no-write", "--max-new-tokens", "8", "--prompts", str(prompts)])
    assert r.exit_code == 1, r.output  # the weakened bake fails
    res = {k: vs[0] for k, vs in json.loads(r.stdout).items()}
    m, a, w = res[str(mlp)], res[str(attn)], res[str(weak)]
    for v in (m, a, w):
        assert v["kind"] == "run" and v["ran"] and v["details"]["ran"] == ["native", "transformers"]
        for impl in ("native", "transformers"):  # the unedited model: both implementations match transformers
            floor = v["details"][impl]["noise_floor_base_sglang_vs_transformers"]
            assert floor["top1"] >= 0.99 and floor["mean_abs_logprob_gap"] < 1e-3, (impl, floor)
        assert v["details"]["native"]["unedited_vs_target"]["mean_abs_logprob_gap"] > 0.01  # the edit matters

    # mlp_bias bake: the native LlamaForCausalLM drops the down_proj bias silently, the flag keeps it
    assert m["status"] == "pass" and m["ok"] and m["launch_flag"] == FLAG, m["message"]
    nat, tf = m["details"]["native"], m["details"]["transformers"]
    assert not nat["passed"] and nat["lost"]
    assert nat["bake_vs_base_in_sglang"]["mean_abs_logprob_gap"] < 1e-4  # exactly the unedited model
    assert tf["passed"] and tf["gap_ratio"] < VLLM_GAP_RATIO / 10 and tf["bake_vs_target"]["top1"] == 1.0
    assert "native LlamaForCausalLM (model_impl auto): FAIL, sglang lost the edit" in m["message"]
    assert "model.layers.1.mlp.down_proj.bias" in m["message"]  # the reason, from the rules
    assert f"`{FLAG}`: pass" in m["message"] and f"launch with `{FLAG}`" in m["message"]

    # o_proj bias (attention_bias): kept natively, no flag needed
    assert a["status"] == "pass" and a["launch_flag"] is None, a["message"]
    assert a["details"]["native"]["passed"] and a["details"]["transformers"]["passed"]
    assert a["details"]["native"]["gap_ratio"] < VLLM_GAP_RATIO / 10
    assert a["message"].startswith("sglang 0.5.23 ran: ran natively and passed")

    # bias x 0.95: loads everywhere, but the edit is the wrong size
    assert w["status"] == "fail" and not w["ok"], w["message"]
    assert not w["details"]["transformers"]["passed"] and not w["details"]["transformers"]["lost"]
    assert "differ from transformers runtime steering by more than allowed" in w["message"]


def test_the_stub_raises_on_any_call_in_sglangs_venv(sglang_python, tmp_path):
    """The stand-ins for torchvision and sgl_kernel import, and raise when anything is called;
    transformers still sees no torchvision."""
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); import torchvision.transforms as T, sgl_kernel\n"
            "from transformers.utils.import_utils import is_torchvision_available as tv\n"
            "assert not tv()\n"
            "try:\n    T.functional.resize(1)\nexcept RuntimeError as e:\n    print('raised:', e)\n"
            "import torch; assert not hasattr(torch.ops.sgl_kernel, 'convert_weight_packed')\n")
    out = subprocess.run([str(sglang_python), "-c", code, str(STUB)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "raised: torchvision.transforms.functional.resize was called" in out.stdout
