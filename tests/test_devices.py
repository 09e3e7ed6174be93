"""Devices (issue 15): every model-running command takes --device/--dtype; models spread by
accelerate (some blocks offloaded to "disk", the rest on "cpu", as a multi-GPU map would spread
them) steer, ablate and compare exactly as the plain model; nothing moves or casts a placed model
behind the user's back."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bakery.cli import main
from bakery.models import load_model, load_tokenizer, read_config
from bakery.placement import (DeviceError, Placement, default_placement, parse_device_map, parse_max_memory,
                              placement_of, resolve_device, resolve_dtype, using_placement)
from bakery.steering.generation import encode_prompts, generate, render_chat
from bakery.steering.hooks import Ablation, steer
from helpers import TINY_PROMPTS, random_vector, real_bake, weakened_copy

MODEL_COMMANDS = ["extract", "steer", "sweep", "compare", "verify", "persist", "bake"]
DISK = (1, 2)  # blocks offloaded to disk; blocks 0 and 3 stay on the cpu


def offload_map(model_dir: Path, disk=DISK) -> dict[str, str]:
    n = read_config(model_dir)["num_hidden_layers"]
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
            **{f"model.layers.{i}": "disk" if i in disk else "cpu" for i in range(n)},
            "model.norm": "cpu", "lm_head": "cpu"}


def dispatched(model_dir: Path, tmp: Path, dtype: str = "float32"):
    return load_model(model_dir, device_map=offload_map(model_dir), offload_folder=tmp / "offload", dtype=dtype)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- resolution --------------------------------------------------------------------------------
def test_auto_device_and_dtype():
    dev = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert dev.type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # no CUDA needed to decide
    assert resolve_dtype("auto", torch.device("cuda"), accelerator_default=torch.float32) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_the_machine_lacks_is_a_clear_error(tiny_models):
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device(spec)
    with pytest.raises(DeviceError, match="no CUDA device"):
        load_model(tiny_models("llama"), device="cuda")
    with pytest.raises(DeviceError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    with pytest.raises(DeviceError, match="unknown dtype"):
        resolve_dtype("int3")
    r = run("steer", "hi", "--vector", "v.safetensors", "--layer", "1", "--coef", "1", "--device", "cuda")
    assert r.exit_code == 2 and "Invalid value for '--device'" in r.output and "no CUDA device" in r.output
    assert "Traceback" not in r.output


def test_device_map_and_max_memory_parsing(tmp_path):
    assert parse_device_map("auto") == "auto" and parse_device_map("Balanced") == "balanced"
    assert parse_device_map('{"model.layers.1": "disk"}') == {"model.layers.1": "disk"}
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"": 0}))
    assert parse_device_map(str(f)) == {"": 0}
    with pytest.raises(DeviceError, match="--device-map takes"):
        parse_device_map("everywhere")
    assert parse_max_memory("0=20GiB,cuda:1=40GiB,cpu=64GiB") == {0: "20GiB", 1: "40GiB", "cpu": "64GiB"}
    with pytest.raises(DeviceError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


def test_batch_size_follows_free_memory_on_a_gpu_and_stays_put_elsewhere(tiny_models):
    from bakery.placement import auto_batch_size

    qwen7b = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  intermediate_size=18944, vocab_size=152064)
    gpu = torch.device("cuda")  # no CUDA needed: the free memory is given
    sizes = [auto_batch_size(qwen7b, 300, default=40, device=gpu, dtype="bfloat16", free_bytes=g * 2**30)
             for g in (1, 8, 60)]
    assert sizes[0] < sizes[1] < sizes[2] <= 256 and sizes[0] >= 1
    # a bf16 token: KV 2 * 28 * 4 * 128 * 2 B = 56 KiB, activations (8 * 3584 + 3 * 18944) * 2 B = 167 KiB,
    # float32 logits 4 * 152064 B = 594 KiB; half of 60 GiB holds 128 rows of 300 tokens, 64 of 600
    assert sizes[2] == 128
    assert auto_batch_size(qwen7b, 600, default=40, device=gpu, dtype="bfloat16", free_bytes=60 * 2**30) == 64
    assert auto_batch_size(qwen7b, 300, default=40, device=gpu, free_bytes=2**50) == 256
    assert auto_batch_size(qwen7b, 300, default=40, device=gpu, free_bytes=1) == 1
    assert auto_batch_size(read_config(tiny_models("llama")), 300, default=40, device="cpu") == 40


# ---- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_takes_device_and_dtype(command):
    r = run(command, "--help")
    assert r.exit_code == 0, r.output
    text = re.sub(r"\s+", " ", r.output)
    assert "--device TEXT" in text and "auto (CUDA, then MPS, then CPU)" in text
    assert re.search(r"--dtype \[auto\|float32\|bfloat16\|float16\]", text)
    assert "--device-map" in text and "--offload-folder" in text


def test_every_command_that_loads_a_model_is_in_the_list():
    """A new command that loads a model must take the options too (it is found by its source)."""
    import importlib
    import inspect
    import pkgutil

    import bakery.cli as cli

    loads = set()
    for mod in pkgutil.iter_modules(cli.__path__):
        src = inspect.getsource(importlib.import_module(f"bakery.cli.{mod.name}"))
        names = {c.name for c in getattr(importlib.import_module(f"bakery.cli.{mod.name}"), "COMMANDS", ())}
        if re.search(r"load_model|steer_compare|run_persist|\bcompare as run|verify as run|extract as run"
                     r"|bakers import bake", src):
            loads |= names
    assert loads == set(MODEL_COMMANDS), loads ^ set(MODEL_COMMANDS)


def test_steer_end_to_end_on_cpu_and_dispatched_gives_the_same_answers(tiny_models, tmp_path):
    d = tiny_models("llama")
    v = random_vector(d, seed=3, scale=0.5).save(tmp_path / "v.safetensors")
    common = ["steer", "hello sea", "tell me about ships", "--vector", v, "--layer", 2, "--coef", 4,
              "--max-new-tokens", 6, "--model", d, "--threads", 1]
    plain = run(*common, "--device", "cpu", "--dtype", "float32")
    assert plain.exit_code == 0, plain.output
    spread = run(*common, "--device-map", json.dumps(offload_map(d)), "--offload-folder", tmp_path / "off",
                 "--dtype", "float32")
    assert spread.exit_code == 0, spread.output
    assert plain.stdout == spread.stdout and "layer 2 = output of block 1" in plain.stdout
    assert default_placement() == Placement()  # the command's placement ended with it
    half = run(*common, "--device", "cpu", "--dtype", "bfloat16")
    assert half.exit_code == 0, half.output


def _compare_cli(tmp_path, export, *placement):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TINY_PROMPTS[:2]))
    return run("compare", export, "--prompts", prompts, "--max-new-tokens", 5, "--greedy-tokens", 4,
               "--no-write", "--threads", 1, *placement)


def _figures(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", out.split("|", 1)[1])]


def test_compare_loads_every_model_where_the_device_map_says(tiny_models, tmp_path, caplog):
    """Each model compare loads follows --device-map (the log says where it went), and the figures
    are those of the plain run: no entry point falls back to its own placement."""
    d = tiny_models("llama")
    export = real_bake("bias", d, random_vector(d, scale=0.1), 2, 3.0, tmp_path / "exact")
    split = {k: "cpu" for k in offload_map(d)}  # a map of one device per module, as on several GPUs
    with caplog.at_level(logging.INFO, logger="bakery.models"):
        plain = _compare_cli(tmp_path, export, "--device", "cpu", "--dtype", "float32")
        assert plain.exit_code == 0, plain.output
        caplog.clear()
        spread = _compare_cli(tmp_path, export, "--device-map", json.dumps(split), "--dtype", "float32")
    assert spread.exit_code == 0, spread.output
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    assert len(loads) == 2 and all("device map 8 on cpu" in m for m in loads), loads
    assert "exact" in plain.stdout
    assert _figures(plain.stdout) == pytest.approx(_figures(spread.stdout), rel=1e-4, abs=1e-6)


def test_compare_of_a_weakened_bake_with_blocks_on_disk_matches_the_plain_run(tiny_models, tmp_path):
    d = tiny_models("llama")
    weak = weakened_copy(real_bake("bias", d, random_vector(d, scale=0.1), 2, 3.0, tmp_path / "exact"),
                         tmp_path / "weak", scale=-1.0)
    plain = _compare_cli(tmp_path, weak, "--device", "cpu", "--dtype", "float32")
    spread = _compare_cli(tmp_path, weak, "--device-map", json.dumps(offload_map(d)),
                          "--offload-folder", tmp_path / "off", "--dtype", "float32")
    assert plain.exit_code == 0 and spread.exit_code == 0, spread.output
    assert _figures(plain.stdout) == pytest.approx(_figures(spread.stdout), rel=1e-4, abs=1e-6)


def test_exactness_bound_of_a_bake_with_blocks_on_disk_is_not_guessed(tiny_models, tmp_path):
    """The bound jitters live weights, which an offloaded model does not hold: compare still
    measures KL and R, and says the exactness verdict was not reached and why."""
    from bakery.fidelity.compare import compare

    d = tiny_models("llama")
    export = real_bake("bias", d, random_vector(d, scale=0.1), 2, 3.0, tmp_path / "exact")
    with using_placement(device_map=offload_map(d), offload_folder=str(tmp_path / "off")):
        (report,) = compare([export], prompts=TINY_PROMPTS[:2], max_new_tokens=5, greedy_tokens=4, write=False,
                            progress=False, log=lambda m: None)
    (plain,) = compare([export], prompts=TINY_PROMPTS[:2], max_new_tokens=5, greedy_tokens=4, write=False,
                       progress=False, log=lambda m: None)
    row, row_plain = (next(r for n, r in rep["rows"].items() if n not in ("base", "steered"))
                      for rep in (report, plain))
    assert row_plain["exact"] and row_plain["kl_bound"] is not None
    assert not row["exact"] and row["kl_bound"] is None
    assert "offloaded" in row["exact_note"] and "not measured" in row["exact_note"]
    assert row["R"] == pytest.approx(row_plain["R"], abs=1e-6)


# ---- hooks on a model spread by accelerate ------------------------------------------------------
def test_load_model_dispatches_with_disk_offload(tiny_models, tmp_path):
    d = tiny_models("llama")
    m = dispatched(d, tmp_path)
    assert m.hf_device_map == offload_map(d)
    for i in DISK:
        assert {p.device.type for p in m.model.layers[i].parameters()} == {"meta"}  # weights on disk
    with using_placement(device_map=offload_map(d), offload_folder=str(tmp_path / "off2")):
        assert load_model(d).hf_device_map == offload_map(d)  # the process-wide placement
        assert not getattr(load_model(d, device="cpu"), "hf_device_map", None)  # an explicit device wins


@pytest.mark.parametrize("layer", [2, 3, 4])  # output of block 1 and 2 (on disk), block 3 (cpu)
def test_steering_on_a_dispatched_model_matches_the_plain_model(tiny_models, tmp_path, layer):
    d = tiny_models("llama")
    plain, spread = load_model(d, device="cpu"), dispatched(d, tmp_path)
    tok = load_tokenizer(d)
    vec = random_vector(d, seed=5, scale=0.5)
    enc = encode_prompts(tok, TINY_PROMPTS)
    with torch.no_grad():
        base = plain(**enc).logits
        with steer(plain, vec, layer, 3.0):
            a = plain(**enc).logits
        with steer(spread, vec, layer, 3.0):
            b = spread(**enc).logits
        assert (a - base).abs().max() > 1e-2  # the steering does something
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        rendered = [render_chat(tok, p) for p in TINY_PROMPTS[:2]]
        with steer(plain, vec, layer, 3.0, positions="response"):
            ga = generate(plain, tok, rendered, max_new_tokens=6)
        with steer(spread, vec, layer, 3.0, positions="response"):
            gb = generate(spread, tok, rendered, max_new_tokens=6)
    assert torch.equal(ga.sequences, gb.sequences) and ga.texts == gb.texts


def test_ablation_on_a_dispatched_model_matches_the_plain_model(tiny_models, tmp_path):
    d = tiny_models("llama")
    plain, spread = load_model(d, device="cpu"), dispatched(d, tmp_path)
    enc = encode_prompts(load_tokenizer(d), TINY_PROMPTS)
    r = random_vector(d, seed=6).vectors[2]
    with torch.no_grad():
        base = plain(**enc).logits
        with Ablation(plain, r):
            a = plain(**enc, output_hidden_states=True)
        with Ablation(spread, r):
            b = spread(**enc, output_hidden_states=True)
    assert (a.logits - base).abs().max() > 1e-3
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    unit = r / r.norm()
    for h in b.hidden_states[:-1]:  # every residual state orthogonal to r, also through disk blocks
        assert (h @ unit).abs().max() < 1e-4


def test_no_library_entry_point_moves_or_casts_a_placed_model(tiny_models, tmp_path):
    """A bf16 model with two blocks on disk: moving it to the CPU raises (accelerate forbids it for
    offloaded weights) and casting it to float32 changes its dtypes; after each entry point every
    parameter must be where and what it was."""
    from bakery.extraction.capture import capture
    from bakery.extraction.sweep import sweep
    from bakery.fidelity.compare import Candidate, run_comparison
    from bakery.fidelity.persist import PersistSettings
    from bakery.fidelity.persist.settings import SWITCH
    from bakery.fidelity.persist.trace import run_condition
    from bakery.fidelity.reference import reference_for
    from bakery.io.manifest import Manifest

    d = tiny_models("llama")
    vec = random_vector(d, seed=7, scale=0.3)
    export = real_bake("bias", d, vec, 2, 3.0, tmp_path / "exact")
    weak = weakened_copy(export, tmp_path / "weak", scale=-1.0)  # R far from 1: no exactness bound
    tok = load_tokenizer(d)
    base = dispatched(d, tmp_path, dtype="bfloat16")
    cand = load_model(weak, device_map=offload_map(weak), offload_folder=tmp_path / "off-c", dtype="bfloat16")
    before, before_c = placement_of(base), placement_of(cand)
    assert {dt for _, dt in before["params"].values()} == {"torch.bfloat16"}
    assert any(dev == "meta" for dev, _ in before["params"].values())
    rendered = [render_chat(tok, p) for p in TINY_PROMPTS[:2]]

    def check(what: str) -> None:
        assert placement_of(base) == before, f"{what} moved or cast the model"
        assert placement_of(cand) == before_c, f"{what} moved or cast the candidate"

    generate(base, tok, rendered, max_new_tokens=3)
    check("generate")
    with steer(base, vec, 2, 2.0):
        generate(base, tok, rendered, max_new_tokens=3, keep_topk=2)
    check("steering")
    with Ablation(base, vec.vectors[2]), torch.no_grad():
        base(**encode_prompts(tok, rendered))
    check("ablation")
    for mode in ("single-pass", "two-pass"):
        capture(base, tok, rendered, max_new_tokens=3, mode=mode)
        check(f"capture {mode}")
    settings = PersistSettings(layer=2, coef=2.0, steer_tokens=2, sample_tokens=2, temperature=0.0)
    run_condition(base, tok, TINY_PROMPTS[:2], settings, condition=SWITCH, direction=vec.vectors[2],
                  vector_norm=float(vec.vectors[2].norm()))
    check("persist")
    sweep(vec, base, tok, [2], [1.0], prompts=TINY_PROMPTS[:2], max_new_tokens=3)
    check("sweep")
    ref = reference_for(export, Manifest.load(export), base_config=read_config(d))
    run_comparison(base, tok, ref, [Candidate("weak", weak, cand)], TINY_PROMPTS[:2], max_new_tokens=3,
                   greedy_tokens=2, progress=False)
    check("compare")
    # the rank-one fit loads its own calibration model under the process-wide placement
    from safetensors.torch import load_file

    from bakery.bakers import bake

    vp = vec.save(tmp_path / "v.safetensors")
    with using_placement(device_map=offload_map(d), offload_folder=str(tmp_path / "off-r")):
        spread_out = bake("bias", d, [(vp, 2, 3.0)], tmp_path / "r-spread", route="rank1",
                          calibration="prompts", progress=False)
    plain_out = bake("bias", d, [(vp, 2, 3.0)], tmp_path / "r-plain", route="rank1", calibration="prompts",
                     progress=False)
    key = "model.layers.1.mlp.down_proj.weight"
    a, b = (load_file(str(o / "model.safetensors"))[key] for o in (plain_out, spread_out))
    assert not torch.equal(a, load_file(str(d / "model.safetensors"))[key])
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
