"""Distilled bakers (kl-lora, kl-full): trajectories, the one-copy teacher, training, resume,
exports and bad input, on tiny random models (the real-model R run is bench/distill.py)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bakery.bakers.api import prepare
from bakery.bakers.distill.pipeline import build_pool
from bakery.bakers.distilled import bake_distilled, train as train_distilled
from bakery.bakers.errors import BakeError
from bakery.bakers.distill.errors import TrainingCheckpointError, DistillError
from bakery.bakers.distill.losses import kl_per_token, kl_topk
from bakery.bakers.distill.targets import check_targets, linear_module_names
from bakery.bakers.distill.train import Distiller
from bakery.bakers.distill.train_config import TrainConfig
from bakery.steering.generation import render_chat
from bakery.io.manifest import Manifest
from bakery.models import load_model, load_tokenizer
from bakery.steering.hooks import steer
from bakery.bakers.distill.errors import TrajectoryError
from bakery.bakers.distill.prompts import clean_question, model_written_prompts, prompt_pool
from bakery.bakers.distill.trajectories import TrajectorySet, collate, collate_topk, sample, to_fidelity
from bakery.vectors.artifact import VectorArtifact
from helpers import ROOT

LAYER, COEF = 2, 4.0


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def shared_traj(tiny, vec_file, tmp_path_factory) -> Path:
    """Trajectories sampled once for the module's training runs (44 prompts x 1, 10 tokens)."""
    work = tmp_path_factory.mktemp("traj")
    req = _req(tiny, vec_file, work / "out", steps=1, trajectories=str(work / "t.jsonl"))
    train_distilled(req, progress=False)
    return work / "t.jsonl"


def _req(tiny, vec_file, out, *, method="kl-lora", steps=6, trajectories=None, **options):
    """A small distilled bake of the tiny model (44 prompts x 1, 10 tokens), checked and not run."""
    opts = dict(steps=steps, val_every=3, lr=5e-3 if method == "kl-lora" else 1e-3, checkpoint_every=0,
                batch_size=8, num_prompts=44, samples_per_prompt=1, max_new_tokens=10, val_prompts=8,
                sample_batch_size=22, trajectories=trajectories, dtype="float32",
                **({"rank": 8} if method == "kl-lora" else {}))
    opts.update(options)
    return prepare(method, str(tiny), [(str(vec_file), LAYER, COEF)], out, **opts)


# ---- prompt pool and trajectories -------------------------------------------------------------------
def test_prompt_pool_is_large_diverse_and_keeps_held_out_questions_out():
    held = ["Tell me about the ocean.", "how do i bake bread?"]
    pool = prompt_pool(exclude=held, extra=["How do I bake bread?", "My own question?"])
    assert len(pool) > 500 and len(set(pool)) == len(pool)
    norm = {" ".join(p.lower().split()).rstrip("?.!") for p in pool}
    assert "tell me about the ocean" not in norm and "how do i bake bread" not in norm
    assert pool[0] == "My own question?"  # a user's or recipe's prompts come first
    assert len({p.split()[0] for p in pool}) >= 8  # many templates, not one


def test_a_model_reply_is_cleaned_to_one_question():
    assert clean_question('A curious person might ask: "What is a cloud made of?"') == "What is a cloud made of?"
    assert clean_question("Question:\n2. Why do owls hunt at night?\nThey are...") == "Why do owls hunt at night?"
    assert clean_question("Someone might ask: How do bridges stay up?") == "How do bridges stay up?"
    assert clean_question("Bridges are strong.") is None  # not a question
    assert clean_question("Why?") is None  # too short to be a prompt
    assert clean_question("") is None


def test_a_model_that_writes_no_questions_warns_and_the_pool_is_still_full(tiny, tmp_path, vec_file):
    m, tok = load_model(tiny), load_tokenizer(tiny)
    with pytest.warns(UserWarning, match="wrote only 0 usable questions in 6 requests"):
        assert model_written_prompts(m, tok, 2, max_new_tokens=4, progress=False) == []
    settings = _req(tiny, vec_file, tmp_path / "x", model_prompts=2).cfg.resolved()
    with pytest.warns(UserWarning, match="usable questions"):
        pool, held = build_pool(settings, model=m, tok=tok)
    assert len(pool) == settings.num_prompts


@pytest.mark.slow
@pytest.mark.full  # generation on the embedded model
def test_the_embedded_model_writes_new_questions_for_the_pool(smol_dir):
    m, tok = load_model(smol_dir), load_tokenizer(smol_dir)
    qs = model_written_prompts(m, tok, 8, progress=False)
    assert len(qs) == 8 and len(set(qs)) == 8 and all(q.endswith("?") for q in qs)
    templated = set(prompt_pool())
    assert not templated & set(qs)  # questions the templates would never write
    again = model_written_prompts(m, tok, 8, exclude=qs[:3], progress=False)  # same seed, held out
    assert not set(again) & set(qs[:3]) and set(qs[3:]) & set(again)


def test_trajectories_roundtrip_and_collate_layout(tiny, vec_file, tmp_path):
    m, tok = load_model(tiny), load_tokenizer(tiny)
    from bakery.vectors.load import load_vector

    vec = load_vector(vec_file)
    ctx = lambda P: steer(m, vec, LAYER, COEF, positions="response")
    ts = sample(m, tok, ["hello sea", "the quick fox", "tell me about ships"], ctx, samples_per_prompt=2,
                max_new_tokens=6, batch_size=4, meta={"layer": LAYER}, progress=False)
    assert len(ts) == 6 and ts.meta["top_p"] == 0.95 and ts.meta["temperature"] == 1.0
    path = ts.save(tmp_path / "t.jsonl")
    back = TrajectorySet.load(path)
    assert [t.response_ids for t in back.items] == [t.response_ids for t in ts.items]
    assert back.meta == ts.meta
    ids, mask, P = collate(back.items[:3], tok.pad_token_id)
    for i, t in enumerate(back.items[:3]):
        assert ids[i, P - len(t.prompt_ids):P].tolist() == t.prompt_ids
        assert ids[i, P:P + len(t.response_ids)].tolist() == t.response_ids
        assert int(mask[i].sum()) == len(t.prompt_ids) + len(t.response_ids)
    assert to_fidelity(back, tok.pad_token_id, 4).num_response_tokens == back.num_response_tokens
    with pytest.raises(TrajectoryError, match="different teacher.*layer"):
        back.check_matches({"layer": LAYER + 1})
    (tmp_path / "bad.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(TrajectoryError, match="not a bakery trajectory file"):
        TrajectorySet.load(tmp_path / "bad.jsonl")


def test_sampled_responses_follow_the_steered_model(tiny, vec_file):
    """Greedy 'sampling' (temperature 0) under steering reproduces the steered model's argmax."""
    from bakery.vectors.load import load_vector

    m, tok = load_model(tiny), load_tokenizer(tiny)
    v = load_vector(vec_file)
    ctx = lambda P: steer(m, v, LAYER, COEF, positions="response", prompt_len=P)
    ts = sample(m, tok, ["hello sea", "tell me about ships"], ctx, max_new_tokens=5, temperature=0.0,
                progress=False)
    ids, mask, P = collate(ts.items, tok.pad_token_id)
    with ctx(P), torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits
    for i, t in enumerate(ts.items):
        pred = logits[i, P - 1:P - 1 + len(t.response_ids)].argmax(-1).tolist()
        assert pred == t.response_ids


# ---- the teacher ------------------------------------------------------------------------------------
def test_teacher_logits_come_from_the_model_without_the_adapter(tiny, vec_file):
    from bakery.vectors.load import load_vector

    v = load_vector(vec_file)
    tok = load_tokenizer(tiny)
    student_base = load_model(tiny)
    ctx_for = lambda mm: (lambda P: steer(mm, v, LAYER, COEF, positions="response", prompt_len=P))
    d = Distiller(student_base, tok.pad_token_id, TrainConfig(rank=8, min_trajectories=1), ctx_for)
    with torch.no_grad():  # make the adapter do something large
        for n, p in d.unwrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    prompts = [render_chat(tok, q) for q in ("hello sea", "the quick fox")]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = torch.cat([enc["input_ids"], torch.randint(3, 100, (2, 6))], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones(2, 6, dtype=torch.long)], 1)
    P = enc["input_ids"].shape[1]
    teacher = d.teacher_logits(ids, mask, P)

    fresh = load_model(tiny)  # an untouched copy of the base model, steered the same way
    with ctx_for(fresh)(P), torch.no_grad():
        ref = torch.log_softmax(fresh(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1], -1)
    ref = ref[mask[:, P:].bool()]
    assert torch.allclose(teacher, ref, atol=1e-5)
    # the adapter really is inside the model object: without disable_adapter() the teacher differs
    with ctx_for(d.unwrapped.get_base_model())(P), torch.no_grad():
        wrong = torch.log_softmax(d.unwrapped(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1], -1)
    assert (wrong[mask[:, P:].bool()] - ref).abs().max() > 1e-2
    # and the teacher is steered: the unsteered base differs too
    with torch.no_grad():
        plain = torch.log_softmax(fresh(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1], -1)
    assert (plain[mask[:, P:].bool()] - ref).abs().max() > 1e-3


def test_the_top_k_kept_from_sampling_is_the_teachers_distribution(tiny, vec_file):
    """--teacher-topk: what sampling keeps equals the teacher's teacher-forced top-k (the training
    target), so training on it needs no teacher forward."""
    from bakery.vectors.load import load_vector

    v = load_vector(vec_file)
    m, tok = load_model(tiny), load_tokenizer(tiny)
    ctx_for = lambda mm: (lambda P: steer(mm, v, LAYER, COEF, positions="response", prompt_len=P))
    ts = sample(m, tok, ["hello sea", "the quick fox", "tell me about ships"], ctx_for(m), samples_per_prompt=2,
                max_new_tokens=7, batch_size=3, keep_topk=8, progress=False)
    assert ts.meta["teacher_topk"] == 8
    d = Distiller(m, tok.pad_token_id, TrainConfig(rank=8, min_trajectories=1), ctx_for)
    ids, mask, P = collate(ts.items, tok.pad_token_id)
    teacher = d.teacher_logits(ids, mask, P)
    kept_ids, kept_lp = collate_topk(ts.items)
    assert kept_ids.shape == (teacher.shape[0], 8)
    assert torch.allclose(teacher.gather(1, kept_ids), kept_lp, atol=1e-4)
    assert torch.allclose(teacher.topk(8, -1).values, kept_lp, atol=1e-4)
    # unsteered logits are not what was kept
    with torch.no_grad():
        plain = torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1], -1)[mask[:, P:].bool()]
    assert (plain.gather(1, kept_ids) - kept_lp).abs().max() > 1e-3


def test_top_k_kl_is_a_lower_bound_that_becomes_exact():
    torch.manual_seed(0)
    t = torch.log_softmax(torch.randn(5, 50) * 3, -1)
    s = torch.log_softmax(torch.randn(5, 50) * 3, -1)
    exact = kl_per_token(t, s)
    full = kl_topk(*reversed(t.topk(50, -1)), s)
    assert torch.allclose(full, exact, atol=1e-4)
    prev = torch.zeros(5)
    for k in (1, 5, 20, 49):
        approx = kl_topk(*reversed(t.topk(k, -1)), s)
        assert (approx >= -1e-6).all() and (approx <= exact + 1e-5).all() and (approx >= prev - 1e-5).all()
        prev = approx
    assert torch.allclose(kl_topk(*reversed(t.topk(10, -1)), t), torch.zeros(5), atol=1e-5)


def test_training_on_the_kept_top_k_learns_the_steering(tiny, vec_file, tmp_path):
    req = _req(tiny, vec_file, tmp_path / "topk", steps=9, teacher_topk=16)
    res = bake_distilled(req, progress=False)
    h = res.result.history
    assert res.info["teacher_topk"] == 16 and h[-1]["val_kl"] < 0.7 * h[0]["val_kl"]
    ts = TrajectorySet.load(tmp_path / "topk.work" / "trajectories.jsonl")
    assert ts.meta["teacher_topk"] == 16 and len(ts.items[0].teacher_topk_ids[0]) == 16
    plain = _req(tiny, vec_file, tmp_path / "plain", steps=1, trajectories=str(tmp_path / "noK.jsonl"))
    bake_distilled(plain, progress=False)  # trajectories without a kept top-k ...
    again = _req(tiny, vec_file, tmp_path / "again", steps=1, trajectories=str(tmp_path / "noK.jsonl"),
                 teacher_topk=16)
    with pytest.raises(TrajectoryError, match="carry no teacher top-k.*new --trajectories file"):
        bake_distilled(again, progress=False)  # ... cannot train a top-k run


# ---- training and export ----------------------------------------------------------------------------
def test_kl_lora_learns_the_steering_and_exports_merged_plus_adapter(tiny, vec_file, shared_traj, tmp_path):
    from peft import PeftModel

    out = tmp_path / "bake"
    res = bake_distilled(_req(tiny, vec_file, out, steps=9, trajectories=str(shared_traj), save_every=6),
                         progress=False)
    hist = res.info["history"]
    assert hist[-1]["val_kl"] < 0.5 * hist[0]["val_kl"], hist
    assert res.info["val_R"] > 0.5
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert sorted(res.info["target_modules"]) == linear_module_names(load_model(tiny))
    m = Manifest.load(out)
    assert m.method == "kl-lora" and m.positions == "response" and not m.exact
    assert m.terms[0].layer == LAYER and (out / m.terms[0].vector_file).is_file()
    assert "kl-lora" in (out / "README.md").read_text()
    assert (tmp_path / "bake.work" / "halfbaked" / "step-000006" / "bakery.json").is_file()

    # merged export (a plain checkpoint) vs base + adapter (peft): same logits
    merged = load_model(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    peft = PeftModel.from_pretrained(load_model(tiny), out / "adapter").eval()
    ts = TrajectorySet.load(shared_traj)
    ids, mask, P = collate(ts.items[:8], 0)
    with torch.no_grad():
        a = merged(input_ids=ids, attention_mask=mask).logits
        b = peft(input_ids=ids, attention_mask=mask).logits
        base = load_model(tiny)(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() < 1e-3
    assert (a - base).abs().max() > 1e-2  # the bake changed something


def test_kl_full_trains_the_blocks_from_the_steered_one_on_with_a_frozen_teacher(tiny, vec_file, shared_traj,
                                                                                 tmp_path):
    out = tmp_path / "full"
    res = bake_distilled(_req(tiny, vec_file, out, method="kl-full", steps=6, trajectories=str(shared_traj)),
                         progress=False)
    # step 0 is the warm-started student, already close (the tiny model: R ~0.71, KL 0.0032 vs the
    # unedited 0.011); six steps take it to ~0.0022. Both comparisons use the same validation set,
    # and each has room for a different CPU's rounding: training cuts ~31% (10% asked), the result
    # is ~0.2 of the unedited model's KL (0.5 asked)
    h = res.info["history"]
    assert h[-1]["val_kl"] < 0.9 * h[0]["val_kl"], h
    assert h[-1]["val_kl"] < 0.5 * res.info["val_kl_base"], (h, res.info["val_kl_base"])
    assert not (out / "adapter").exists()
    assert Manifest.load(out).method == "kl-full" and res.info["first_block"] == LAYER - 1
    base, baked = load_model(tiny), load_model(out)
    changed = {n for (n, p), (_, q) in zip(base.named_parameters(), baked.named_parameters())
               if not torch.equal(p, q)}
    # every linear of blocks LAYER-1 and later moves, full rank; earlier blocks compute the same in
    # the steered teacher, so they stay as they were
    expect = {n + ".weight" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)
              and ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) >= LAYER - 1}
    assert changed == expect and len(expect) == 7 * (base.config.num_hidden_layers - LAYER + 1)


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny, vec_file, shared_traj, tmp_path):
    straight = train_distilled(_req(tiny, vec_file, tmp_path / "a", steps=8, trajectories=str(shared_traj),
                                    checkpoint_every=4, patience=0), progress=False)
    # interrupted after 6 steps: the checkpoint holds step 4, steps 5-6 are lost and redone
    req = _req(tiny, vec_file, tmp_path / "b", steps=8, trajectories=str(shared_traj), checkpoint_every=4,
               patience=0)
    cut = train_distilled(req, progress=False, stop_after=6)
    assert cut.result.steps == 6
    req.cfg.resume = True
    resumed = train_distilled(req, progress=False)
    assert resumed.result.steps == 8
    a = [h["val_kl"] for h in straight.result.history]
    b = [h["val_kl"] for h in resumed.result.history]
    assert len(a) == len(b)
    assert a[-1] == pytest.approx(b[-1], rel=1e-4)


def test_resume_does_not_replace_a_finished_export_without_force(tiny, vec_file, shared_traj, tmp_path):
    req = _req(tiny, vec_file, tmp_path / "exp", steps=2, trajectories=str(shared_traj), checkpoint_every=2)
    out = bake_distilled(req, progress=False).out
    before = (out / "model.safetensors").read_bytes()
    req.cfg.resume, req.cfg.steps = True, 4
    with pytest.raises(FileExistsError, match="--force"):
        bake_distilled(req, progress=False)
    assert (out / "model.safetensors").read_bytes() == before
    assert Manifest.load(bake_distilled(req, force=True, progress=False).out).extra["steps"] == 4


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_validation_kl(tiny, vec_file, shared_traj, tmp_path):
    """A real SIGKILL of `python -m bakery bake --method kl-lora` once a checkpoint exists, then resume."""
    def cmd(out, *extra):
        return [sys.executable, "-m", "bakery", "bake", "--method", "kl-lora", "--model", str(tiny),
                "-v", str(vec_file), "-l", str(LAYER), "-c", str(COEF), "-o", str(out), "--rank", "8",
                "--steps", "10", *_sets(trajectories=shared_traj, num_prompts=44, val_prompts=8, lr="5e-3",
                                        val_every=5, patience=0, checkpoint_every=2, dtype="float32"), *extra]

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd(tmp_path / "a"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "b.work" / "checkpoint" / "trainer.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (ck.is_file() and json.loads(ck.read_text())["step"] >= 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b").exists()
    r = subprocess.run(cmd(tmp_path / "b", "--set", "resume=true"), check=True, env=env, capture_output=True, text=True)
    va = Manifest.load(tmp_path / "a").extra["best_val_kl"]
    vb = Manifest.load(tmp_path / "b").extra["best_val_kl"]
    assert vb == pytest.approx(va, rel=1e-3), r.stdout


def test_two_process_accelerate_launch_trains_and_exports(tiny, vec_file, shared_traj, tmp_path):
    acc = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "ddp"
    # accelerate's "--cpu" flag runs ONE process; "--multi_gpu" is its torchrun launcher, and the
    # Accelerator then picks MULTI_CPU with the gloo backend when there is no GPU.
    cmd = [str(acc), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "bakery", "bake", "--method", "kl-lora", "--model", str(tiny),
           "-v", str(vec_file), "-l", str(LAYER), "-c", str(COEF), "-o", str(out), "--rank", "8", "--steps", "4",
           *_sets(trajectories=shared_traj, num_prompts=44, val_prompts=8, lr="5e-3", val_every=2,
                  checkpoint_every=2, dtype="float32")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = Manifest.load(out)
    assert m.extra["processes"] == 2 and m.extra["steps"] == 4
    assert m.extra["replicas_in_sync"] is True  # gradients were averaged across the two processes
    h = m.extra["history"]
    assert h[-1]["val_kl"] < h[0]["val_kl"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert f"baked {out}" in r.stdout  # written once, by the main process


# ---- bad input --------------------------------------------------------------------------------------
def test_too_few_trajectories_is_a_clear_error(tiny, vec_file, shared_traj, tmp_path):
    req = _req(tiny, vec_file, tmp_path / "x", trajectories=str(shared_traj), min_trajectories=1000)
    with pytest.raises(TrajectoryError, match="only 36 training trajectories.*at least 1000"):
        bake_distilled(req, progress=False)
    assert not (tmp_path / "x").exists()
    req = _req(tiny, vec_file, tmp_path / "y", trajectories=str(shared_traj), val_prompts=60)
    with pytest.raises(DistillError, match="only 44 prompts"):
        bake_distilled(req, progress=False)


def test_a_vllm_teacher_needs_positions_all(tiny, vec_file, tmp_path):
    req = _req(tiny, vec_file, tmp_path / "x", teacher_engine="vllm")
    with pytest.raises(DistillError, match="exact bias bake.*positions=response.*--positions all"):
        bake_distilled(req, progress=False)
    with pytest.raises(BakeError, match="must be one of transformers, vllm"):
        _req(tiny, vec_file, tmp_path / "y", teacher_engine="sglang")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_full_fine_tuning_moves_the_block_linears_only(tiny):
    """kl-full trains every weight of the target linears and leaves embeddings and norms alone."""
    m = load_model(tiny)
    tc = TrainConfig(method="full", max_steps=1)
    d = Distiller(m, 0, tc, lambda mm: (lambda P: contextlib.nullcontext()))
    trained = {n for n, p in d.student.named_parameters() if p.requires_grad}
    linears = {n for n, mod in d.student.named_modules() if isinstance(mod, torch.nn.Linear)
               and ".layers." in n}
    assert trained == {n + ".weight" for n in linears} | {n + ".bias" for n in linears
                                                         if getattr(d.student.get_submodule(n), "bias", None) is not None}
    assert not any("embed" in n or "norm" in n for n in trained)
    d = Distiller(load_model(tiny), 0, TrainConfig(method="full", target_modules=["down_proj"]),
                  lambda mm: (lambda P: contextlib.nullcontext()))
    assert {n.split(".")[-2] for n, p in d.student.named_parameters() if p.requires_grad} == {"down_proj"}


def test_a_rank_vllm_cannot_serve_warns():
    with pytest.warns(UserWarning, match="rank 12 cannot be served by vLLM"):
        TrainConfig(rank=12).check()
    with contextlib.ExitStack():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            TrainConfig(rank=32).check()


def test_a_target_module_the_architecture_lacks_is_refused(tiny, tiny_models):
    m = load_model(tiny)
    with pytest.raises(DistillError, match="c_attn.*do not exist in llama.*q_proj"):
        check_targets(m, ["q_proj", "c_attn"])
    assert "c_attn" in linear_module_names(load_model(tiny_models("gpt2")))


def test_lora_from_a_first_block_adapts_only_the_blocks_from_there_on(tiny):
    from bakery.bakers.distill.lora import add_lora

    m = load_model(tiny)
    n = len(m.model.layers)
    adapted = {int(name.split(".layers.")[1].split(".")[0])
               for name, _ in add_lora(m, TrainConfig(rank=4, first_block=n - 1)).named_parameters()
               if "lora_A" in name}
    assert adapted == {n - 1}
    with pytest.raises(DistillError, match=f"first_block must be between 0 and {n - 1}"):
        add_lora(load_model(tiny), TrainConfig(rank=4, first_block=n))


def _small_fs(path: Path):
    """A 2 MB tmpfs at ``path`` (real ENOSPC), or None where mounting is not allowed."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True)
    return path if r.returncode == 0 else None


def test_running_out_of_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny, vec_file, tmp_path):
    from bakery.vectors.load import load_vector

    v = load_vector(vec_file)
    tok = load_tokenizer(tiny)
    ctx_for = lambda mm: (lambda P: steer(mm, v, LAYER, COEF, prompt_len=P))
    d = Distiller(load_model(tiny), tok.pad_token_id, TrainConfig(rank=8), ctx_for)
    work = _small_fs(tmp_path / "fs")
    mounted = work is not None
    try:
        if not mounted:  # no mount rights: a file-size limit gives the same failed write (EFBIG)
            work = tmp_path / "fs"
        d.step = 3
        first = d.save_checkpoint(work)
        assert json.loads((first / "trainer.json").read_text())["step"] == 3
        d.best_state = {k: torch.zeros(400_000) for k in "abcd"}  # too big for what is left
        d.step = 7
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if not mounted:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
        try:
            with pytest.raises(TrainingCheckpointError, match="checkpoint at step 7.*previous checkpoint.*intact") as e:
                d.save_checkpoint(work)
            if mounted:
                assert "out of disk space" in str(e.value)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)
        assert json.loads((work / "checkpoint" / "trainer.json").read_text())["step"] == 3
        assert not (work / "checkpoint.tmp").exists()
        d2 = Distiller(load_model(tiny), tok.pad_token_id, TrainConfig(rank=8), ctx_for)
        assert d2.load_checkpoint(work) and d2.step == 3
    finally:
        if mounted:
            import gc

            gc.collect()
            subprocess.run(["umount", "-l", str(work)], check=False)


@pytest.mark.slow
@pytest.mark.full  # a long distillation on the embedded model
def test_kl_lora_on_the_embedded_model_moves_towards_the_steered_model(smol_dir, tmp_path):
    """A few LoRA steps on SmolLM2 with a random direction, from a zero adapter: validation KL
    falls; merged == adapter. (From the warm start, a few steps at this lr only add noise.)"""
    from peft import PeftModel

    torch.manual_seed(0)
    m = load_model(smol_dir)
    v = torch.randn(m.config.num_hidden_layers + 1, m.config.hidden_size)
    v = v / v.norm(dim=-1, keepdim=True) * 30  # about the pirate vector's norm: a visible effect
    del m
    req = prepare("kl-lora", str(smol_dir), [(VectorArtifact(v, {"trait": "rand"}), 16, 1.0)], tmp_path / "smol",
                  num_prompts=40, samples_per_prompt=1, max_new_tokens=12, val_prompts=8, sample_batch_size=20,
                  dtype="float32", rank=8, steps=4, val_every=2, batch_size=8, lr=2e-4, checkpoint_every=0,
                  warm_start=False)
    res = bake_distilled(req, progress=False)
    h = res.info["history"]
    assert h[-1]["val_kl"] < h[0]["val_kl"]
    ts = TrajectorySet.load(tmp_path / "smol.work" / "trajectories.jsonl")
    ids, mask, _ = collate(ts.items[:4], load_tokenizer(smol_dir).pad_token_id)
    peft = PeftModel.from_pretrained(load_model(smol_dir), tmp_path / "smol" / "adapter").eval()
    with torch.no_grad():
        diff = (load_model(tmp_path / "smol")(input_ids=ids, attention_mask=mask).logits
                - peft(input_ids=ids, attention_mask=mask).logits).abs().max()
    # float32 rounding of the merged weights, over logits of size ~20 (relative ~1e-4)
    assert diff < 3e-3


def test_the_library_registry_bakes_kl_lora_with_merged_weights_and_adapter(tiny, vec_file, tmp_path):
    """bakery.bakers.bake("kl-lora", ...) from a notebook writes what the CLI writes; the adapter
    names the source's Hub id as its base, not the local folder it was trained from."""
    import shutil

    from bakery.bakers import available, bake

    assert {"kl-lora", "kl-full"} <= set(available())
    src = tmp_path / "from-hub"
    shutil.copytree(tiny, src)
    (src / "bakery_source.json").write_text(json.dumps({"hub_id": "someorg/tiny-llama"}))
    out = bake("kl-lora", str(src), [(str(vec_file), LAYER, COEF)], tmp_path / "reg", num_prompts=30,
               samples_per_prompt=1, max_new_tokens=8, steps=3, val_prompts=6, rank=8, lr=5e-3,
               positions="all", work_dir=str(tmp_path / "work"), progress=False)
    m = Manifest.load(out)
    assert m.method == "kl-lora" and m.route == "lora-merged" and m.extra["steps"] == 3
    assert m.positions == "all" and m.terms[0].trait == "rand" and "--method kl-lora" in m.command
    # no command given: one that redoes this bake from the export's vector, options included
    assert f"--vector {out}/vectors/rand.safetensors" in m.command and "--set num_prompts=30" in m.command
    assert "--steps 3" in m.command and "--positions all" in m.command and m.command.endswith(f"-o {out}")
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "vectors" / "rand.safetensors").is_file()
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "someorg/tiny-llama"
    assert str(src) not in (out / "adapter" / "README.md").read_text()
    assert m.source["hub_id"] == "someorg/tiny-llama"
    base, baked = load_model(tiny), load_model(out)
    changed = {n.rsplit(".", 2)[-2] for (n, p), (_, q) in zip(base.named_parameters(), baked.named_parameters())
               if not torch.equal(p, q)}
    assert changed == set(linear_module_names(base))  # exactly the LoRA targets, merged
    with pytest.raises(BakeError, match="unknown option.*bogus"):
        bake("kl-lora", str(tiny), [(str(vec_file), LAYER, COEF)], tmp_path / "bad", bogus=1, progress=False)
    assert not (tmp_path / "bad").exists()


def test_distilled_cards_hold_usage_reproduce_and_wording_of_their_own_method(tiny, vec_file, shared_traj,
                                                                               tmp_path):
    """Each card: the common section (usage lines, Reproduce, re-rendered by push) and a distill
    section that describes the method's own weights; an odd trait name gets a slugged vector file."""
    from bakery.io.card import SECTION
    from bakery.io.card_sections import read_section
    from bakery.hub import card_for_repo

    for method in ("kl-lora", "kl-full"):
        out = tmp_path / method
        req = _req(tiny, vec_file, out, method=method, steps=1, trajectories=str(shared_traj))
        req.terms[0].trait = "My trait/v2"
        req.command = f"bakery bake --method {method} --set 'held_out=[\"a b\"]' -o {out}"
        bake_distilled(req, progress=False)
        m = Manifest.load(out)
        assert m.terms[0].trait == "My trait/v2" and m.command == req.command
        assert m.terms[0].vector_file == "vectors/my-trait-v2.safetensors"
        assert (out / m.terms[0].vector_file).is_file() and not (out / "vectors" / "My trait").exists()
        text = (out / "README.md").read_text()
        assert text.count("\n# ") == 1  # one title
        common, distill = read_section(text, SECTION), read_section(text, "distill")
        assert common is not None and distill is not None
        assert common.split("## Reproduce", 1)[1].strip() == f"```bash\n{req.command}\n```"
        assert f'from_pretrained("{out}")' in common and f"vllm serve {out}" in common
        assert "(vectors/my-trait-v2.safetensors)" in common and "exact: **false**" in common
        assert "KL(steered || model)" in distill
        if method == "kl-lora":
            assert "LoRA is merged" in distill and "`adapter/`" in distill
            assert "PeftModel.from_pretrained" in distill and "--lora-modules my-trait-v2=adapter" in distill
        else:
            assert "full fine-tuning of blocks 1 and later" in distill and "no LoRA" in distill
            assert "merged" not in distill and "adapter/" not in distill and not (out / "adapter").exists()
        # push re-renders the common section with the repo id and keeps the distill one
        pushed = card_for_repo(out, m, "someorg/baked")
        assert 'from_pretrained("someorg/baked")' in pushed and "vllm serve someorg/baked" in pushed
        assert f'from_pretrained("{out}")' not in pushed
        assert read_section(pushed, "distill") == distill


def test_a_library_bakes_command_reads_back_through_the_bake_cli(tiny, vec_file):
    """A kl-lora config's reproduce command parses back through `bakery bake` to the same term
    and the same config, lists and awkward strings included."""
    from bakery.bakers import get_baker, make_config, reproduce_command
    from bakery.bakers.request import BakeRequest, Term
    from bakery.cli.bake import _parse_settings, bake as bake_cli
    from bakery.vectors.load import load_vector

    opts = {"steps": 3, "rank": 8, "positions": "all", "num_prompts": 30, "lr": 5e-3, "rslora": True,
            "target_modules": ["q_proj", "v_proj"], "held_out": ["Is it 3, or 4?", "yes"], "recipe": "no",
            "work_dir": "/tmp/a b"}
    req = BakeRequest(model_dir=tiny, model_name="some/model", config={}, method="kl-lora",
                      terms=[Term(load_vector(vec_file), LAYER, 0.1 + 0.2, "t")],
                      cfg=make_config("kl-lora", opts), out=Path("out dir"))
    cmd = reproduce_command(req, get_baker("kl-lora"))
    args = shlex.split(cmd)
    assert args[:2] == ["bakery", "bake"]
    ctx = bake_cli.make_context("bake", args[2:])
    p = ctx.params
    assert (p["method"], p["model"], p["vector_path"], p["layer"], p["coef"], p["output"]) == (
        "kl-lora", "some/model", "out dir/vectors/t.safetensors", LAYER, 0.1 + 0.2, "out dir")
    assert (p["steps"], p["rank"], p["positions"]) == (3, 8, "all")
    back = _parse_settings(p["settings"])
    assert back == {k: v for k, v in opts.items() if k not in ("steps", "rank", "positions")}
    assert make_config("kl-lora", {**back, "steps": 3, "rank": 8, "positions": "all"}) == req.cfg


def _sets(**settings) -> list[str]:
    """``--set KEY=VALUE`` items for `bakery bake`."""
    return [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]


def _launch(args: list[str], *, fsdp: bool) -> subprocess.CompletedProcess:
    acc = Path(sys.executable).with_name("accelerate")
    mode = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    cmd = [str(acc), "launch", *mode, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "bakery", "bake", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.full  # FSDP (CI's multi-process launch is the data-parallel one above)
@pytest.mark.parametrize("method", ["kl-full", "kl-lora"])
def test_fsdp_launch_on_cpu_shards_the_blocks_trains_resumes_and_exports(tiny_models, vec_file, tmp_path, method):
    """`accelerate launch --use_fsdp` on CPU: accelerate itself would run plain data parallel, so
    bakery shards the blocks with FSDP2; the run matches one process, resumes from a checkpoint
    gathered from the shards, and exports whole weights (plus adapter/ for LoRA). The model's
    residual has a nearly constant direction, so the warm start takes the neuron gate."""
    tiny = tiny_models("llama", residual_offset=1.0)
    shared_traj = tmp_path / "t.jsonl"  # sampled by the one-process run, reused by the launches
    lr = "5e-3" if method == "kl-lora" else "1e-3"
    args = ["--model", str(tiny), "-v", str(vec_file), "-l", str(LAYER), "-c", str(COEF), "--method", method,
            *(["--rank", "8"] if method == "kl-lora" else []),
            *_sets(trajectories=shared_traj, num_prompts=44, val_prompts=8, lr=lr, val_every=2,
                   checkpoint_every=2, patience=0, dtype="float32")]
    single = bake_distilled(_req(tiny, vec_file, tmp_path / "single", method=method, steps=6,
                                 trajectories=str(shared_traj), val_every=2, patience=0, lr=float(lr)),
                            progress=False)
    out = tmp_path / "fsdp"
    r = _launch([*args, "-o", str(out), "--steps", "4"], fsdp=True)  # stops at step 4 ...
    assert r.returncode == 0, r.stderr[-3000:]
    r = _launch([*args, "-o", str(out), "--steps", "6", "--set", "resume=true", "--force"], fsdp=True)  # ... and resumes
    assert r.returncode == 0, r.stderr[-3000:]
    m = Manifest.load(out)
    assert m.extra["sharding"] == "FSDP2 by bakery (accelerate runs MULTI_CPU)" and m.extra["processes"] == 2
    assert m.extra["activation_checkpointing"] is True  # the default under FSDP
    assert [h["step"] for h in m.extra["history"]] == [0, 2, 4, 6]
    assert m.extra["best_val_kl"] == pytest.approx(single.info["best_val_kl"], rel=2e-2)
    # against the unedited model's KL: kl-full's step 0 is already the warm start (0.69 of it here)
    assert m.extra["best_val_kl"] < 0.5 * m.extra["val_kl_base"]
    # the same warm start in both: the neuron gate, written into each process's shards (kl-lora:
    # its LoRA components, on the blocks from the steered one on)
    assert m.extra["warm_start"]["gate"] == single.info["warm_start"]["gate"] == "neuron"
    assert m.extra["warm_start"]["neuron"] == single.info["warm_start"]["neuron"]
    assert m.extra["first_block"] == single.info["first_block"] == LAYER - 1
    # the export holds whole weights: the same model as the one-process run, reloadable as is
    a, b = load_model(single.out), load_model(out)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert p.shape == q.shape and torch.allclose(p, q, atol=5e-3), n
    assert (out / "adapter" / "adapter_model.safetensors").is_file() == (method == "kl-lora")