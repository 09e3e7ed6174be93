"""bakery verify: transformers strict reload and the exactness rule, sglang's loading rules (the
fallback verdict when sglang is absent: rules only, not run), engine discovery and the engine
registry, exit statuses (no vLLM or sglang run here: see test_vllm.py and test_sglang.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bakery.cli import main
from bakery.engines import sglang, vllm as vllm_engine
from bakery.engines.setup import Setup
from bakery.engines.verdict import Verdict
from bakery.engines.transformers import verify_transformers
from bakery.engines.verify import (ENGINES, Engine, EngineNotInstalled, exit_status, parse_verify_engines,
                                   verdicts_markdown, verify, write_verdicts)
from bakery.engines.scores import gap
from bakery.engines.vllm import find_vllm_python
from bakery.fidelity.exact import EXACT_R
from bakery.io.manifest import ManifestError
from helpers import TINY_PROMPTS, make_bias_bake, random_vector, real_bake, two_vector_bake, weakened_copy


@pytest.fixture
def bakes(tiny_models, tmp_path):
    d = tiny_models("llama")
    vec = random_vector(d, scale=0.1)
    return {"base": d, "vec": vec,
            "exact": real_bake("bias", d, vec, 2, 3.0, tmp_path / "exact"),
            "broken": make_bias_bake(d, vec, 2, 3.0, tmp_path / "broken", broken=True),
            "ortho": real_bake("ortho", d, vec, 2, None, tmp_path / "ortho")}


@pytest.fixture
def no_sglang(monkeypatch, tmp_path):
    """sglang's venv out of reach: the checks fall back to its loading rules."""
    monkeypatch.setenv("BAKERY_SGLANG_PYTHON", str(tmp_path / "no-sglang" / "python"))
    monkeypatch.setattr(sglang, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_vllm(monkeypatch, tmp_path):
    monkeypatch.setenv("BAKERY_VLLM_PYTHON", str(tmp_path / "no-vllm" / "python"))
    monkeypatch.setattr(vllm_engine, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def exact_bake(tiny_models, tmp_path):
    d = tiny_models("llama")
    return real_bake("bias", d, random_vector(d, scale=0.1), 2, 3.0, tmp_path / "exact")


def _setup(export):
    return Setup(export, prompts=TINY_PROMPTS[:3], max_new_tokens=8)


def test_transformers_passes_exact_bias_and_ortho_bakes(bakes):
    for name in ("exact", "ortho"):
        v = verify_transformers(_setup(bakes[name]))
        assert v.status == "pass" and v.passed and v.ran, v.message
        assert v.details["R"] > 0.999 and not v.details["unexpected"] and not v.details["missing"]
        ex = v.details["exactness"]
        assert ex["exact"] and ex["kl"] <= ex["kl_bound"] < 1e-13 and ex["storage"] == "float32"
        assert "exact: KL" in v.message
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


def test_a_weakened_bias_bake_is_not_exact(bakes, tmp_path):
    """The down_proj bias scaled by 0.95: R stays above 0.9999 on this tiny model (its norms
    absorb most of a 5% change), so only the rounding bound on the KL catches it; the old rule
    (R >= 0.99) passed it."""
    weak = weakened_copy(bakes["exact"], tmp_path / "weak", 0.95)
    v = verify_transformers(_setup(weak))
    assert v.status == "fail" and "recorded as exact" in v.message, v.message
    ex = v.details["exactness"]
    assert not ex["exact"] and ex["R"] > EXACT_R > 0.99  # R alone would pass it
    assert ex["kl"] > 1e4 * ex["kl_bound"] and "the KL that float rounding" in v.message
    # the exact bake it was copied from is 1000-fold below the same kind of bound
    good = verify_transformers(_setup(bakes["exact"])).details["exactness"]
    assert good["kl"] < ex["kl"] * 1e-6
    r = CliRunner().invoke(main, ["verify", str(weak), "--engine", "transformers", "--no-write",
                                  "--max-new-tokens", "8"])
    assert r.exit_code == 1 and "FAIL " in r.output and "recorded as exact" in r.output


def test_a_two_vector_bias_bake_passes(tiny_models, tmp_path):
    d = tiny_models("llama")
    two = two_vector_bake(d, tmp_path)
    s = _setup(two)
    assert len(s.ref.terms) == 2 and s.ref.multi_vector
    v = verify_transformers(s)
    assert v.status == "pass", v.message
    assert v.details["exactness"]["exact"] and v.details["R"] >= EXACT_R
    assert set(v.details["edited"]) == {"model.layers.1.mlp.down_proj.bias", "model.layers.2.mlp.down_proj.bias"}
    # measured against the first term only, the same bake is far off: the reference has both terms
    one = Setup(two, prompts=TINY_PROMPTS[:3], max_new_tokens=8)
    one.ref.terms = one.ref.terms[:1]
    assert verify_transformers(one).status == "fail"


def test_sglang_rules(bakes, tiny_models, tmp_path):
    v = sglang.check(bakes["exact"])
    assert v.status == "needs-flag" and v.flag == "--model-impl transformers"
    assert v.native_dropped == ["model.layers.1.mlp.down_proj.bias"]  # zero siblings are harmless
    v = sglang.check(bakes["broken"])
    assert v.status == "fail" and "mlp_bias" in v.reasons[0]
    assert sglang.check(bakes["ortho"]).status == "ok"
    assert sglang.check(bakes["base"]).status == "ok"
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
    assert sglang.check(mid).status == "ok"
    # GPT-2 carries every bias natively
    g = tiny_models("gpt2")
    gd = tmp_path / "gpt2"
    shutil.copytree(g, gd)
    sd = load_file(str(gd / "model.safetensors"))
    sd["transformer.h.1.mlp.c_proj.bias"] = sd["transformer.h.1.mlp.c_proj.bias"] + 1.0
    save_file(sd, str(gd / "model.safetensors"), metadata={"format": "pt"})
    assert sglang.check(gd).status == "ok"


def test_sglang_fallback_verdicts_are_rules_only(bakes):
    v = sglang.rules_verdict(bakes["exact"])
    assert v.kind == "rules" and not v.ran and not v.passed and not v.failed and v.status == "not-run"
    assert v.label == "– rules only (not run)" and v.message.startswith("rules only (not run)")
    assert v.launch_flag == "--model-impl transformers"
    d = v.to_dict()
    assert d["ran"] is False and d["ok"] is False and d["label"] == v.label
    bad = sglang.rules_verdict(bakes["broken"])
    assert bad.failed and bad.label == "✘ FAIL, rules only (not run)"
    assert "| sglang | ✘ FAIL, rules only (not run) |" in verdicts_markdown([bad])
    # an export with no non-zero bias: nothing checked, so nothing passed
    o = sglang.rules_verdict(bakes["ortho"])
    assert o.status == "not-run" and "rules only (not run)" in verdicts_markdown([o])
    with pytest.raises(ValueError, match="cannot pass"):
        Verdict("sglang", "pass", "", kind="rules")


def test_exit_status_counts_only_real_runs():
    run_ok = Verdict("transformers", "pass", "")
    rules_ok = Verdict("sglang", "not-run", "", kind="rules")
    rules_bad = Verdict("sglang", "fail", "", kind="rules")
    missing = Verdict("vllm", "not-run", "", kind="not-installed")
    assert exit_status({"a": [rules_ok]}) == 3
    assert exit_status({"a": [rules_ok, missing]}) == 3
    assert exit_status({"a": [run_ok, rules_ok, missing]}) == 0
    assert exit_status({"a": [run_ok, rules_bad]}) == 1
    assert exit_status({"a": [run_ok], "b": [rules_ok]}) == 3  # every export needs a real run
    assert exit_status({"a": [Verdict("transformers", "fail", "")], "b": [rules_ok]}) == 1


def test_cli_sglang_missing(bakes, no_sglang, no_vllm):
    exact_bake = bakes["exact"]
    # asked for by name, a missing sglang is an error that says how to install it
    r = CliRunner().invoke(main, ["verify", str(exact_bake), "--engine", "sglang", "--no-write"])
    assert r.exit_code == 2 and "make sglang" in r.output and "BAKERY_SGLANG_PYTHON" in r.output, r.output
    # under all it falls back to the rules: not a pass
    r = CliRunner().invoke(main, ["verify", str(exact_bake), "--json", "--no-write", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output  # transformers ran and passed
    d = {v["engine"]: v for v in json.loads(r.stdout)[str(exact_bake)]}
    s = d["sglang"]
    assert s["ran"] is False and s["kind"] == "rules" and s["label"] == "– rules only (not run)" and not s["ok"]
    assert s["message"].startswith("sglang is not installed") and "rules only (not run): sglang 0.5.23" in s["message"]
    assert s["launch_flag"] == "--model-impl transformers" and d["vllm"]["kind"] == "not-installed"
    # a rule violation found without running anything still fails
    r = CliRunner().invoke(main, ["verify", str(bakes["broken"]), "--no-write", "--max-new-tokens", "4"])
    assert r.exit_code == 1 and "FAIL " in r.output and "✘ FAIL, rules only (not run)" in r.output


def test_engine_registry_takes_one_entry_per_engine(bakes, monkeypatch):
    """A new engine is one entry: found before anything runs, one verdict per export, its own
    fallback when missing, shown after the built-in engines."""
    calls = []

    def run(setups, log=None):
        calls.append([s.export.name for s in setups])
        return [Verdict("toy", "pass", f"ran {s.export.name}") for s in setups]

    monkeypatch.setitem(ENGINES, "toy", Engine(run))
    out = verify([bakes["exact"], bakes["ortho"]], "transformers,toy", prompts=TINY_PROMPTS[:2], max_new_tokens=4,
                 write=False)
    assert calls == [["exact", "ortho"]]
    assert [v.engine for v in out[str(bakes["ortho"])]] == ["transformers", "toy"]
    assert out[str(bakes["ortho"])][1].message == "ran ortho"

    def gone():
        raise EngineNotInstalled("toy is not installed")

    monkeypatch.setitem(ENGINES, "toy", Engine(run, find=gone))
    with pytest.raises(EngineNotInstalled, match="toy is not installed"):
        verify([bakes["exact"]], "toy", write=False)
    out = verify([bakes["exact"]], "toy", write=False, skip_missing=True)
    (v,) = out[str(bakes["exact"])]
    assert v.kind == "not-installed" and v.message == "toy is not installed" and len(calls) == 1


def test_old_verify_json_sglang_pass_is_relabelled(exact_bake):
    folder = exact_bake / "compare"
    folder.mkdir()
    (folder / "verify.json").write_text(json.dumps({"sglang": {
        "engine": "sglang", "status": "pass", "ok": True, "message": "static check: loads natively",
        "launch_flag": None, "details": {}}}))
    write_verdicts(exact_bake, [Verdict("transformers", "pass", "strict reload clean")])
    saved = json.loads((folder / "verify.json").read_text())
    assert saved["sglang"]["status"] == "not-run" and saved["sglang"]["ran"] is False
    card = (exact_bake / "README.md").read_text()
    assert "| sglang | – rules only (not run) |" in card and "| transformers | ✔ pass |" in card


def test_gap_counts_only_response_positions():
    rows = [([1, 2, 3, 4], 2)]
    a = [{"logprob": [None, -9.0, -1.0, -2.0], "top1": [None, 5, 3, 4]}]
    b = [{"logprob": [None, 0.0, -1.5, -2.0], "top1": [None, 6, 3, 7]}]
    g = gap(a, b, rows)
    assert g["positions"] == 2 and g["top1"] == 0.5 and g["mean_abs_logprob_gap"] == pytest.approx(0.25)


def test_vllm_not_installed_says_how_to_install(monkeypatch, tmp_path, bakes, no_sglang):
    monkeypatch.setenv("BAKERY_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    monkeypatch.setattr(vllm_engine, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EngineNotInstalled, match="make vllm") as e:
        find_vllm_python()
    assert "BAKERY_VLLM_PYTHON" in str(e.value)
    r = CliRunner().invoke(main, ["verify", str(bakes["exact"]), "--engine", "vllm", "--no-write"])
    assert r.exit_code == 2 and "make vllm" in r.output
    # under `all` it is a verdict, and the other engines still run
    out = verify([bakes["exact"]], "all", prompts=TINY_PROMPTS[:2], max_new_tokens=4, write=False)
    statuses = {v.engine: (v.status, v.kind) for v in out[str(bakes["exact"])]}
    assert statuses == {"transformers": ("pass", "run"), "vllm": ("not-run", "not-installed"),
                        "sglang": ("not-run", "rules"), "llama.cpp": ("not-run", "not-applicable")}
    assert exit_status(out) == 0  # one real run passed; nothing failed
    llama = next(v for v in out[str(bakes["exact"])] if v.engine == "llama.cpp")
    assert "bakery gguf" in llama.message and llama.label == "– not applicable (not run)"


def test_llamacpp_by_name_on_an_export_without_gguf_is_bad_input(bakes):
    """Asked for by name, an engine that cannot check the input is an error (exit 2), not a verdict."""
    r = CliRunner().invoke(main, ["verify", str(bakes["exact"]), "--engine", "llama.cpp", "--no-write"])
    assert r.exit_code == 2 and "bakery gguf" in r.output, r.output


def test_cli_verify_writes_card_and_exit_codes(bakes, no_sglang, no_vllm):
    r = CliRunner().invoke(main, ["verify", str(bakes["exact"]), "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    assert "--model-impl transformers" in r.output
    card = (bakes["exact"] / "README.md").read_text()
    assert "<!-- bakery:engines -->" in card and "| transformers | ✔ pass |" in card
    assert "| sglang | – rules only (not run) |" in card and "nothing ran there" in card
    saved = json.loads((bakes["exact"] / "compare" / "verify.json").read_text())
    assert set(saved) == {"transformers", "vllm", "sglang"} and saved["sglang"]["ran"] is False
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
        parse_verify_engines("tgi")
    assert parse_verify_engines("vllm, sglang") == ["vllm", "sglang"] and parse_verify_engines("") == [
        "transformers", "vllm", "sglang", "llama.cpp"]


def test_sglang_engine_plan_gives_each_base_only_its_own_rows():
    """Exports of two different base models in one call: each base scores its own exports' token
    ids only (ids of one tokenizer can be out of the other's vocabulary)."""
    engines, base_of = sglang.engine_plan([("/a", "/tiny", [[1, 2], [3]]), ("/b", "/smol", [[900, 901]]),
                                           ("/c", "/tiny", [[4, 5, 6]])])
    by_name = {e["name"]: e for e in engines}
    assert len(engines) == 3 * 2 + 2 * 2  # every export and every base, native and transformers
    assert {e["impl"] for e in engines} == {"auto", "transformers"}
    assert by_name["base0-native"]["path"] == "/tiny" and by_name["base0-native"]["prompts"] == [[1, 2], [3], [4, 5, 6]]
    assert by_name["base1-transformers"]["prompts"] == [[900, 901]]
    assert by_name["bake2-transformers"]["prompts"] == [[4, 5, 6]]
    assert base_of == [("base0", 0), ("base1", 0), ("base0", 2)]
