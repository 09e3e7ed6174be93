"""bakery verify: transformers strict reload, sglang static rules, vLLM discovery (no vLLM run here;
the real vLLM run is in test_vllm.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bakery.engines import verify as engines, sglang_rules
from bakery.cli import main
from bakery.engines.verify import EngineNotInstalled, Setup, find_vllm_python, gap, verify, verify_transformers
from bakery.io.manifest import ManifestError
from test_compare import PROMPTS, make_bias_bake, random_vector, real_bake


@pytest.fixture
def bakes(tiny_models, tmp_path):
    d = tiny_models("llama")
    vec = random_vector(d, scale=0.1)
    return {"base": d, "vec": vec,
            "exact": real_bake("bias", d, vec, 2, 3.0, tmp_path / "exact"),
            "broken": make_bias_bake(d, vec, 2, 3.0, tmp_path / "broken", broken=True),
            "ortho": real_bake("ortho", d, vec, 2, None, tmp_path / "ortho")}


def _setup(export):
    return Setup(export, prompts=PROMPTS[:3], max_new_tokens=8)


def test_transformers_passes_exact_bias_and_ortho_bakes(bakes):
    for name in ("exact", "ortho"):
        v = verify_transformers(_setup(bakes[name]))
        assert v.status == "pass", v.message
        assert v.details["R"] > 0.999 and not v.details["unexpected"] and not v.details["missing"]
    v = verify_transformers(_setup(bakes["exact"]))
    assert v.details["edited"]["model.layers.1.mlp.down_proj.bias"] > 0
    assert v.details["new_tensors"] == 3 * 4  # gate/up/down biases of 4 blocks, zeros but one


def test_transformers_catches_the_broken_bake(bakes):
    v = verify_transformers(_setup(bakes["broken"]))
    assert v.status == "fail"
    assert "unexpected key" in v.message and "mlp_bias: true" in v.message and "edit is lost" in v.message
    assert "equal the base model" in v.message  # and the logits show it


def test_transformers_catches_missing_keys_and_unchanged_weights(bakes, tmp_path):
    ex = tmp_path / "missing"
    shutil.copytree(bakes["exact"], ex)
    sd = load_file(str(ex / "model.safetensors"))
    del sd["model.layers.3.mlp.gate_proj.bias"]
    save_file(sd, str(ex / "model.safetensors"), metadata={"format": "pt"})
    v = verify_transformers(_setup(ex))
    assert v.status == "fail" and "missing key" in v.message
    # an "export" that is the untouched model with a manifest
    same = tmp_path / "same"
    shutil.copytree(bakes["base"], same)
    shutil.copy(bakes["exact"] / "bakery.json", same / "bakery.json")
    shutil.copytree(bakes["exact"] / "vectors", same / "vectors")
    v = verify_transformers(_setup(same))
    assert v.status == "fail" and "identical to the base" in v.message


def test_exact_flag_is_checked_against_runtime_steering(bakes, tmp_path):
    # a bake recorded as exact whose bias holds the wrong coefficient
    ex = tmp_path / "wrongcoef"
    make_bias_bake(bakes["base"], bakes["vec"], 2, 1.0, ex)
    m = json.loads((ex / "bakery.json").read_text())
    m["terms"][0]["coef"] = 3.0
    (ex / "bakery.json").write_text(json.dumps(m))
    v = verify_transformers(_setup(ex))
    assert v.status == "fail" and "recorded as exact" in v.message


def test_sglang_rules(bakes, tiny_models, tmp_path):
    v = sglang_rules.check(bakes["exact"])
    assert v.status == "needs-flag" and v.flag == "--model-impl transformers"
    assert v.native_dropped == ["model.layers.1.mlp.down_proj.bias"]  # zero siblings are harmless
    v = sglang_rules.check(bakes["broken"])
    assert v.status == "fail" and "mlp_bias" in v.reasons[0]
    assert sglang_rules.check(bakes["ortho"]).status == "ok"
    assert sglang_rules.check(bakes["base"]).status == "ok"
    # the mid-layer site: an o_proj bias with attention_bias on loads natively
    mid = tmp_path / "mid"
    shutil.copytree(bakes["base"], mid)
    sd = load_file(str(mid / "model.safetensors"))
    cfg = json.loads((mid / "config.json").read_text())
    cfg["attention_bias"] = True
    for i in range(cfg["num_hidden_layers"]):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = sd[f"model.layers.{i}.self_attn.{p}.weight"]
            sd[f"model.layers.{i}.self_attn.{p}.bias"] = torch.zeros(w.shape[0])
    sd["model.layers.2.self_attn.o_proj.bias"] = torch.ones(cfg["hidden_size"])
    save_file(sd, str(mid / "model.safetensors"), metadata={"format": "pt"})
    (mid / "config.json").write_text(json.dumps(cfg))
    assert sglang_rules.check(mid).status == "ok"
    # GPT-2 carries every bias natively
    g = tiny_models("gpt2")
    gd = tmp_path / "gpt2"
    shutil.copytree(g, gd)
    sd = load_file(str(gd / "model.safetensors"))
    sd["transformer.h.1.mlp.c_proj.bias"] = sd["transformer.h.1.mlp.c_proj.bias"] + 1.0
    save_file(sd, str(gd / "model.safetensors"), metadata={"format": "pt"})
    assert sglang_rules.check(gd).status == "ok"


def test_gap_counts_only_response_positions():
    rows = [([1, 2, 3, 4], 2)]
    a = [{"logprob": [None, -9.0, -1.0, -2.0], "top1": [None, 5, 3, 4]}]
    b = [{"logprob": [None, 0.0, -1.5, -2.0], "top1": [None, 6, 3, 7]}]
    g = gap(a, b, rows)
    assert g["positions"] == 2 and g["top1"] == 0.5 and g["mean_abs_logprob_gap"] == pytest.approx(0.25)


def test_vllm_not_installed_says_how_to_install(monkeypatch, tmp_path, bakes):
    monkeypatch.setenv("BAKERY_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    monkeypatch.setattr(engines, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EngineNotInstalled, match="make vllm") as e:
        find_vllm_python()
    assert "BAKERY_VLLM_PYTHON" in str(e.value)
    r = CliRunner().invoke(main, ["verify", str(bakes["exact"]), "--engine", "vllm", "--no-write"])
    assert r.exit_code == 2 and "make vllm" in r.output
    # under `all` it is a verdict, and the other engines still run
    out = verify([bakes["exact"]], "all", prompts=PROMPTS[:2], max_new_tokens=4, write=False)
    statuses = {v.engine: v.status for v in out[str(bakes["exact"])]}
    assert statuses == {"transformers": "pass", "vllm": "not-installed", "sglang": "needs-flag"}


def test_cli_verify_writes_card_and_exit_codes(bakes):
    r = CliRunner().invoke(main, ["verify", str(bakes["exact"]), "--engine", "transformers,sglang",
                                  "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    assert "--model-impl transformers" in r.output
    card = (bakes["exact"] / "README.md").read_text()
    assert "<!-- bakery:engines -->" in card and "| transformers | ✔ pass |" in card
    saved = json.loads((bakes["exact"] / "compare" / "verify.json").read_text())
    assert set(saved) == {"transformers", "sglang"}
    r = CliRunner().invoke(main, ["verify", str(bakes["broken"]), "--engine", "transformers", "--no-write"])
    assert r.exit_code == 1 and "mlp_bias: true" in r.output
    assert not (bakes["broken"] / "compare").exists()


def test_verify_without_manifest_is_refused(tiny_models, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_models("llama"), bare)
    with pytest.raises(ManifestError, match="no bakery.json"):
        verify([bare], "transformers", write=False)
    r = CliRunner().invoke(main, ["verify", str(bare), "--engine", "sglang"])
    assert r.exit_code == 2 and "no bakery.json" in r.output
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        engines.parse_engines("tgi")
