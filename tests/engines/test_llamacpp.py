"""llama.cpp: the GGUF folder and control-vector plumbing (fast), and real runs in llama-cpp-python
(slow, .venv-llamacpp from `make llamacpp`): a bias bake of the embedded Q4_1 GGUF equals
llama.cpp's own control-vector steering within the jitter floor measured in the same run and the
same bias on the wrong block does not; in an F32 GGUF the bake equals the control vector to
rounding and matches transformers steering within the engine-to-engine floor; the export converted
by llama.cpp's own converter runs as it does in transformers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bakery.engines.verdict import EngineNotInstalled
from bakery.engines.llamacpp import (ENGINE_RATIO, GGUFFolderError, JITTER_RATIO, check_source, control_vector,
                                     find_llamacpp_python, gguf_of, gguf_setup, read_gguf_folder, verify_llamacpp)
from bakery.fidelity.reference import Reference
from bakery.vectors.artifact import VectorArtifact

PROMPTS = ["How do I cook rice?", "Tell me about the sea.", "What makes a good friend?",
           "Describe a rainy afternoon."]
LAYER, COEF = 16, 2.0  # layer 16 = output of block 15 = llama.cpp's blk.15 / control vector il 15


# ---- fast: no llama.cpp needed ---------------------------------------------------------------------
def test_control_vector_puts_each_term_at_its_block_and_refuses_block_0():
    v = VectorArtifact(torch.randn(7, 4), {"trait": "t"})
    ref = Reference(v, 3, [(3, 2.0), (5, -1.0)])
    cv, why = control_vector(ref, n_embd=4, n_layer=6)
    assert why == "" and (cv.il_start, cv.il_end) == (2, 4)
    buf = cv.buffer.reshape(5, 4)  # from block 1: row i is block i + 1
    assert np.allclose(buf[1], 2.0 * v.vectors[3].numpy()) and np.allclose(buf[3], -1.0 * v.vectors[5].numpy())
    assert not buf[[0, 2, 4]].any()
    cv0, why0 = control_vector(Reference(v, 1, [(1, 1.0)]), n_embd=4, n_layer=6)
    assert cv0 is None and "block 0" in why0
    abl, why_abl = control_vector(Reference(v, 3, [], ablation={"layer": 3}), n_embd=4, n_layer=6)
    assert abl is None and "ablation" in why_abl


def test_gguf_folder_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(GGUFFolderError, match="bakery gguf"):
        read_gguf_folder(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "bakery-gguf.json").write_text(json.dumps({"gguf": "m.gguf", "export": str(tmp_path / "nope")}))
    with pytest.raises(GGUFFolderError, match="not an export folder"):
        read_gguf_folder(tmp_path)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (tmp_path / "src.gguf").write_bytes(b"GGUF source")
    (tmp_path / "bakery-gguf.json").write_text(json.dumps({
        "gguf": "m.gguf", "export": str(export),
        "source_gguf": {"path": str(tmp_path / "src.gguf"), "sha256": "0" * 64}}))
    with pytest.raises(GGUFFolderError, match="changed since `bakery gguf`"):
        check_source(read_gguf_folder(tmp_path))
    with pytest.raises(GGUFFolderError, match="bakery gguf .*export -o OUTDIR"):
        gguf_of(SimpleNamespace(export=export, gguf=None))
    monkeypatch.setenv("BAKERY_LLAMACPP_PYTHON", str(tmp_path / "no-python"))
    monkeypatch.setattr("bakery.engines.llamacpp.REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EngineNotInstalled, match="make llamacpp"):
        find_llamacpp_python()


# ---- slow: real llama.cpp ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pirate_bias(smol_pirate_bias, smol_pirate, tmp_path_factory):
    """The session's bias bake of the embedded model (layer 16, coef 2), its vector and a folder."""
    try:
        find_llamacpp_python()
    except EngineNotInstalled as e:
        pytest.fail(f"the llama.cpp tests need llama-cpp-python: {e}")
    return tmp_path_factory.mktemp("llamacpp"), smol_pirate_bias, smol_pirate


def _terms(block: int) -> list[dict]:
    return [{"layer": block + 1, "block": block, "coef": COEF, "vector_file": "vectors/pirate.safetensors"}]


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.full  # two more llama.cpp workers; CI's llama.cpp run is the F32 one below
def test_q4_1_bias_bake_equals_llamacpp_control_vector_and_wrong_block_fails(pirate_bias):
    from gguf_bakes import bias_gguf_folder, embedded_gguf

    from bakery.gguf import gguf_bake

    tmp, export, vec = pirate_bias
    bias = (COEF * vec.row(LAYER)).numpy()
    good = gguf_bake(export, tmp / "q4-good", from_gguf=embedded_gguf())
    # no baker writes the wrong block: made by hand, the same tensor one block off
    wrong = bias_gguf_folder(embedded_gguf(), export, tmp / "q4-wrong", {LAYER - 4: bias}, terms=_terms(LAYER - 4))
    g = read_gguf_folder(good)
    assert g.export == export.resolve() and g.edit == "bias" and g.source == embedded_gguf().resolve()
    lines = []
    ok, bad = verify_llamacpp([gguf_setup(good, prompts=PROMPTS, max_new_tokens=32),
                               gguf_setup(wrong, prompts=PROMPTS, max_new_tokens=32)], log=lines.append)
    print("\nQ4_1 bake:", ok.message, "\nwrong block:", bad.message)
    d = ok.details
    assert ok.status == "pass" and ok.kind == "run", ok.message
    assert d["added_params"] == 576  # llama.cpp loaded the one added bias
    a, jit, un = d["bake_vs_cvec"], d["jitter_floor"], d["unsteered_vs_cvec"]
    assert a["positions"] >= 100
    assert a["mean_abs_logprob_gap"] <= JITTER_RATIO * jit["mean_abs_logprob_gap"] + 1e-4
    assert un["mean_abs_logprob_gap"] > 0.5 and a["mean_abs_logprob_gap"] < 0.25 * un["mean_abs_logprob_gap"]
    assert "jitter floor" in ok.message and "noise floor" in ok.message
    # the same bias one block off loads (576 parameters) but is not llama.cpp's steering at block 15
    assert bad.status == "fail" and bad.details["added_params"] == 576
    assert "llama.cpp's own steering" in bad.message, bad.message
    assert bad.details["bake_vs_cvec"]["mean_abs_logprob_gap"] > 2 * a["mean_abs_logprob_gap"]
    assert any(line.startswith("[llamacpp_worker]") for line in lines)
    # the command line: `--engine all` on a GGUF folder runs llama.cpp alone and records it there
    from click.testing import CliRunner

    from bakery.cli import main

    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    r = CliRunner().invoke(main, ["verify", str(good), "--prompts", str(prompts), "--max-new-tokens", "32"])
    assert r.exit_code == 0, r.output
    saved = json.loads((good / "compare" / "verify.json").read_text())
    assert set(saved) == {"llama.cpp"} and saved["llama.cpp"]["ok"] is True
    assert "| transformers | – not applicable (not run) |" in r.output


@pytest.mark.slow
@pytest.mark.llamacpp
def test_f32_bias_bake_equals_control_vector_and_transformers_steering(pirate_bias):
    from gguf_bakes import copy_gguf, embedded_gguf

    from bakery.gguf import gguf_bake

    tmp, export, vec = pirate_bias
    f32 = copy_gguf(embedded_gguf(), tmp / "smollm2-f32.gguf", dequantize=True)
    folder = gguf_bake(export, tmp / "f32-good", from_gguf=f32)
    # and the export converted by llama.cpp's own converter: no source GGUF, so no control vector
    converted = gguf_bake(export, tmp / "f32-converted", outtype="f32")
    v, c = verify_llamacpp([gguf_setup(folder, prompts=PROMPTS, max_new_tokens=32),
                            gguf_setup(converted, prompts=PROMPTS, max_new_tokens=32)])
    print("\nF32:", v.message, "\nconverted:", c.message)
    assert c.status == "pass" and "(a) not run: no unedited source GGUF" in c.message, c.message
    same = c.details["bake_vs_transformers_bake"]  # the same weights in both engines
    assert same["top1"] >= 0.99 and same["mean_abs_logprob_gap"] < 0.01
    d = v.details
    assert v.status == "pass", v.message
    assert d["bake_vs_cvec"]["top1"] >= 0.99 and d["bake_vs_cvec"]["mean_abs_logprob_gap"] < 0.01
    floor = d["noise_floor_source_llamacpp_vs_transformers"]
    b = d["bake_vs_target"]
    # the engine-to-engine floor: the unedited GGUF against the unedited model in transformers
    assert b["top1"] >= floor["top1"] - 0.05
    assert b["mean_abs_logprob_gap"] <= ENGINE_RATIO * floor["mean_abs_logprob_gap"]
    assert b["mean_abs_logprob_gap"] < 0.1 * d["unedited_vs_target"]["mean_abs_logprob_gap"]
