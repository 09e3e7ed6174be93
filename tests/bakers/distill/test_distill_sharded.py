"""Sharded distillation pieces: loading each process's rows on meta-built models, the streamed
export from shards, the kl-full teacher as swapped-in source values, and activation checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bakery.bakers.distill.lora import lora_init_value
from bakery.bakers.api import prepare
from bakery.bakers.distilled import train as train_distilled
from bakery.bakers.distill.lora import add_lora
from bakery.bakers.distill.train_config import TrainConfig
from bakery.io.checkpoint import CheckpointReader
from bakery.models import load_model
from bakery.steering.hooks import steer
from helpers import ROOT
from tiny import make_tiny

LAYER, COEF = 2, 4.0


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    """A tiny Llama with a tied head, as SmolLM2 has (the head is no tensor of its own on disk)."""
    return make_tiny("llama", tmp_path_factory.mktemp("tied") / "m", seed=3, tie_word_embeddings=True)


def test_lora_starts_from_the_same_matrices_however_it_was_built(tied):
    a = add_lora(load_model(tied), TrainConfig(rank=4, seed=7))
    b = add_lora(load_model(tied), TrainConfig(rank=4, seed=7))
    c = add_lora(load_model(tied), TrainConfig(rank=4, seed=8))
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    lora = [n for n in pa if ".lora_" in n]
    assert lora and all(torch.equal(pa[n], pb[n]) for n in lora)
    assert all(torch.equal(pa[n], lora_init_value(n, tuple(pa[n].shape), 7)) for n in lora)
    assert all(not pa[n].any() for n in lora if ".lora_B." in n)
    assert any(not torch.equal(pa[n], pc[n]) for n in lora if ".lora_A." in n)


@pytest.mark.slow
@pytest.mark.full  # FSDP
def test_two_processes_each_hold_half_the_rows_and_write_the_export_from_them(tied, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        str(Path(__file__).with_name("sharded_worker.py")), str(tied), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    # every block tensor split by rows: together the two processes hold each row once, each at most half
    assert reports[0]["rows_held"] + reports[1]["rows_held"] == reports[0]["rows_total"]
    assert max(r["max_local_fraction"] for r in reports) <= 0.5
    # the frozen embeddings, final norm and head are whole in each process (not sharded)
    for r in reports:
        assert sorted(n.removeprefix("base_model.model.") for n, _ in r["whole_outside"]) == [
            "model.embed_tokens.weight", "model.norm.weight"]
        assert all(whole for _, whole in r["whole_outside"])
    # the head is tied: one tensor on disk, one parameter (tied again after to_empty)
    assert "lm_head.weight" not in CheckpointReader(tied)
    assert all(r["tied"] for r in reports)
    # the export streamed from the shards equals peft's merge of the same adapter, unsharded
    staged, plain = CheckpointReader(tmp_path / "staged"), CheckpointReader(tmp_path / "plain")
    assert set(staged.keys()) == set(plain.keys())
    for k in plain.keys():
        torch.testing.assert_close(staged.get(k), plain.get(k), atol=1e-6, rtol=0), k
    # the same A matrices as the unsharded path drew (B was set alike on both sides)
    adapter = load_file(str(tmp_path / "staged" / "adapter" / "adapter_model.safetensors"))
    plain_a = torch.load(tmp_path / "plain_lora_a.pt", weights_only=True)
    assert len(plain_a) == sum(".lora_A." in k for k in adapter)
    for n, t in plain_a.items():
        torch.testing.assert_close(adapter[n.replace(".default.", ".")], t), n
    assert json.loads((tmp_path / "staged" / "config.json").read_text())["tie_word_embeddings"] is True
    assert reports[0]["targets"]["target_modules"]


def _req(model, vec_file, out, traj, method="kl-full", **options):
    opts = dict(steps=4, val_every=2, lr=1e-3 if method == "kl-full" else 5e-3, checkpoint_every=0, batch_size=8,
                num_prompts=30, samples_per_prompt=1, max_new_tokens=8, val_prompts=6, sample_batch_size=15,
                trajectories=str(traj), **({"rank": 8} if method == "kl-lora" else {}))
    opts.update(options)
    return prepare(method, str(model), [(str(vec_file), LAYER, COEF)], out, **opts)


def test_the_kl_full_teacher_is_the_source_model_steered_with_no_second_copy(tied, vec_file, tmp_path):
    t = train_distilled(_req(tied, vec_file, tmp_path / "o", tmp_path / "traj.jsonl"), progress=False)
    d = t.distiller
    src = load_model(tied)
    trained = {n for n, p in d.unwrapped.named_parameters() if p.requires_grad}
    # the teacher keeps the source values of the trained weights only
    assert set(d.teacher_state) == trained and d.teacher is None
    assert sum(v.numel() for v in d.teacher_state.values()) < 0.8 * sum(p.numel() for p in src.parameters())
    moved = {n for n, p in d.unwrapped.named_parameters()
             if not torch.equal(p, dict(src.named_parameters())[n])}
    assert moved and moved <= trained  # the student moved (warm start + training), frozen weights did not
    before = {n: p.detach().clone() for n, p in d.unwrapped.named_parameters()}
    ids, mask, P = _batch(tmp_path / "traj.jsonl", t.run.tok.pad_token_id)
    got = d.teacher_logits(ids, mask, P)
    from bakery.fidelity.metrics import response_logprobs

    with torch.no_grad(), steer(src, t.run.vec, LAYER, COEF, positions="response", prompt_len=P):
        kept = ids.shape[1] - P + 1
        want = response_logprobs(src(input_ids=ids, attention_mask=mask, logits_to_keep=kept).logits, mask, P, kept)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and the student holds its own weights again afterwards
    assert all(torch.equal(p, before[n]) for n, p in d.unwrapped.named_parameters())


def _batch(path: Path, pad_id: int):
    from bakery.bakers.distill.trajectories import TrajectorySet, collate

    return collate(TrajectorySet.load(path).items[:4], pad_id)


def test_activation_checkpointing_trains_the_same_weights(tied, vec_file, tmp_path):
    traj = tmp_path / "traj.jsonl"
    a = train_distilled(_req(tied, vec_file, tmp_path / "a", traj, method="kl-lora", steps=3), progress=False)
    b = train_distilled(_req(tied, vec_file, tmp_path / "b", traj, method="kl-lora", steps=3,
                             activation_checkpointing=True), progress=False)
    assert [h["val_kl"] for h in a.result.history] == pytest.approx([h["val_kl"] for h in b.result.history],
                                                                       rel=1e-5)
    pa, pb = dict(a.distiller.unwrapped.named_parameters()), dict(b.distiller.unwrapped.named_parameters())
    assert pa.keys() == pb.keys()  # no wrapper module renames anything
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], atol=1e-6, rtol=0), n


@pytest.mark.slow
@pytest.mark.full  # FSDP
def test_an_fsdp_launch_samples_its_own_trajectories_with_the_sharded_model(tied, vec_file, tmp_path):
    """No trajectory file: each process samples its share of the prompts with its shards, stepping in
    sync, and the main process joins them; the run trains and exports as usual."""
    from bakery.bakers.distill.trajectories import TrajectorySet
    from bakery.io.manifest import Manifest

    acc = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "o"
    cmd = [str(acc), "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bakery", "bake", "--model", str(tied),
           "-v", str(vec_file), "-l", str(LAYER), "-c", str(COEF), "--method", "kl-lora", "--rank", "8",
           "--steps", "2", "-o", str(out),
           *[a for k, v in {"num_prompts": 21, "val_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 6,
                            "sample_batch_size": 4, "val_every": 2, "checkpoint_every": 0, "min_trajectories": 4,
                            "batch_size": 4, "dtype": "float32"}.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ts = TrajectorySet.load(tmp_path / "o.work" / "trajectories.jsonl")
    assert ts.meta["sampled_by_processes"] == 2
    assert len({t.prompt for t in ts.items}) >= 19  # 21 prompts (11 and 10 per process); an empty answer is dropped
    assert not list((tmp_path / "o.work").glob("*.part*"))
    m = Manifest.load(out)
    assert m.extra["processes"] == 2 and m.extra["sharding"].startswith("FSDP2 by bakery")
    assert load_model(out).config.tie_word_embeddings
