"""The distillation pipeline behind ``kl-lora`` and ``kl-full``: train weights that behave like
the steered model.

Flow: a diverse prompt pool (held-out questions left out) -> trajectories sampled from the
runtime-steered model (:mod:`~bakery.bakers.distill.trajectories`) -> ``KL(steered || student)``
training on their response tokens (:mod:`~bakery.bakers.distill.train`) -> the weights to export:
the LoRA merged into the base weights plus the peft adapter, or for ``kl-full`` the fine-tuned
weights, which start from a gated rank-one steering write (:mod:`~bakery.bakers.distill.warm_start`).
The export itself is the one every baker writes (:func:`bakery.bakers.export.write_export`).

Run it as ``bakery bake --method kl-lora ...`` or ``bakery.bakers.bake("kl-lora", ...)``;
data-parallel as ``accelerate launch --multi_gpu --num_processes 2 -m bakery bake --method kl-lora
...``, or sharded with ``--use_fsdp --fsdp_version 2`` (:mod:`~bakery.bakers.distill.sharding`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bakery.bakers.checks import refuse_quantized
from bakery.io.folders import EXPORT, check_output
from bakery.bakers.distill.export import DistilledWeights, StagedWeights, is_wrapper
from bakery.bakers.distill.sharded_export import stage_sharded
from bakery.bakers.distill.sharded_load import build_sharded_student, refuse_unshardable
from bakery.bakers.distill.sharding import fsdp_requested
from bakery.bakers.distill.targets import unwrap_peft
from bakery.bakers.export import source_info_for
from bakery.bakers.distill.errors import DistillError
from bakery.bakers.distill.train import Distiller, TrainResult
from bakery.bakers.distill.train_config import TrainConfig
from bakery.steering.hooks import steer
from bakery.bakers.distill.trajectories import (TrajectorySet, model_written_prompts, prompt_pool, read_prompt_file, sample,
                                 sample_vllm)
from bakery.vectors.artifact import VectorArtifact
from bakery.vectors.load import load_vector
from bakery.bakers.distill.warm_start import apply_lora_warm_start, apply_warm_start, default_lora_first_block

METHODS = {"kl-lora": "lora", "kl-full": "full"}
TEACHER_ENGINES = ("transformers", "vllm")


@dataclass
class DistillRequest:
    """One distilled bake. ``model`` is a resolved folder or name; ``vector`` a file or artifact."""

    model: str
    vector: str | Path
    layer: int
    coef: float
    out: str | Path
    method: str = "kl-lora"
    model_name: str | None = None  # the name the user gave (a Hub id, a folder), for the manifest
    positions: str = "response"
    trait: str | None = None
    recipe: str | None = None  # trait recipe: extraction questions join the pool, eval ones are held out
    prompts_file: str | None = None
    held_out: list[str] = field(default_factory=list)  # never trained on
    num_prompts: int = 200
    model_prompts: int = 0  # questions the model writes itself, added to the pool
    samples_per_prompt: int = 2
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    sample_batch_size: int = 16
    val_prompts: int = 16
    trajectories: str | None = None  # JSONL to reuse (or write)
    teacher_engine: str = "transformers"  # vllm: sample the exact bias bake (positions=all only)
    work_dir: str | None = None  # checkpoints, trajectories, half-baked exports
    resume: bool = False
    dtype: str = "source"  # export dtype: source | float32 | bfloat16 | float16
    force: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    command: str = ""
    trust_remote_code: bool = False
    job: Any = None  # the BakeRequest of the export (bakery.bakers.bake builds it)


def teacher_meta(model_dir: Path, config: dict, vec: VectorArtifact, req: DistillRequest) -> dict:
    from bakery.models import config_hash

    return {"model_config_hash": config_hash(config), "vector_sha256": vec.sha256(),
            "layer": req.layer, "coef": req.coef, "positions": req.positions}


def build_pool(req: DistillRequest, model=None, tok=None, progress: bool = False) -> tuple[list[str], list[str]]:
    """(training pool, held-out questions). Recipe eval questions and ``held_out`` never train;
    with ``req.model_prompts`` the (unsteered) ``model`` writes that many questions of its own."""
    extra: list[str] = []
    held = list(req.held_out)
    if req.recipe:
        from bakery.extraction.recipes import load_trait_recipe

        r = load_trait_recipe(req.recipe)
        extra += r.extract_questions
        held += r.eval_questions
    if req.prompts_file:
        extra += read_prompt_file(req.prompts_file)
    if req.model_prompts:
        if model is None:
            raise DistillError("model-written prompts need the model: pass it to build_pool")
        extra += model_written_prompts(model, tok, req.model_prompts, exclude=held + extra,
                                       seed=req.train.seed, progress=progress)
    return prompt_pool(req.num_prompts, extra=extra, exclude=held, seed=req.train.seed), held


def check_teacher_engine(req: DistillRequest) -> None:
    if req.teacher_engine not in TEACHER_ENGINES:
        raise DistillError(f"--teacher-engine must be one of {', '.join(TEACHER_ENGINES)}; got "
                           f"'{req.teacher_engine}'")
    if req.teacher_engine == "vllm" and req.positions != "all":
        raise DistillError(
            "--teacher-engine vllm samples from the exact bias bake, which equals steering at every "
            f"position; positions={req.positions} steering has no such bake. Use --positions all, or "
            "--teacher-engine transformers (hooked generation)")


def sample_from_bias_bake(req: DistillRequest, model_dir: Path, model, tok, vec: VectorArtifact,
                          trait: str, pool: list[str], meta: dict, work: Path) -> TrajectorySet:
    """``positions=all``: bake ``coef * v`` exactly as a bias into ``work/teacher-bias`` and sample
    the teacher's trajectories from that checkpoint in vLLM."""
    from bakery.bakers.api import bake as run_bake
    from bakery.steering.generation import eos_token_ids

    teacher_dir = run_bake("bias", str(model_dir), [(vec, req.layer, req.coef, trait)], work / "teacher-bias",
                           target_engines="vllm", force=True, progress=False)
    return sample_vllm(teacher_dir, tok, pool, samples_per_prompt=req.samples_per_prompt,
                       max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                       seed=req.train.seed, meta=meta, eos_ids=eos_token_ids(model, tok),
                       keep_topk=req.train.teacher_topk)


def sample_sharded(model, tok, pool: list[str], context, req: DistillRequest, meta: dict, path: Path, acc, *,
                   progress: bool) -> None:
    """Sample the teacher's trajectories with a sharded model: each process takes every n-th prompt,
    generation steps in sync (every forward is a collective), and the main process joins the
    parts into ``path``."""
    import math

    n, rank = acc.num_processes, acc.process_index
    if len(pool) < n:
        raise DistillError(f"{len(pool)} prompts cannot be shared by {n} processes: raise --num-prompts")
    mine = pool[rank::n]
    calls = math.ceil(math.ceil(len(pool) / n) * req.samples_per_prompt / req.sample_batch_size)
    t0 = time.perf_counter()
    part = sample(model, tok, mine, context, samples_per_prompt=req.samples_per_prompt,
                  max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                  batch_size=req.sample_batch_size, seed=req.train.seed + 7919 * rank, meta=meta,
                  progress=progress and acc.is_main_process, keep_topk=req.train.teacher_topk,
                  synced_calls=calls)
    part.save(path.with_name(f"{path.name}.part{rank}"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        parts = [path.with_name(f"{path.name}.part{r}") for r in range(n)]
        ts = TrajectorySet(meta={**part.meta, "sample_seconds": round(time.perf_counter() - t0, 1),
                                 "sampled_by_processes": n})
        for p in parts:
            ts.items += TrajectorySet.load(p).items
        ts.save(path)
        for p in parts:
            p.unlink()


def trains_down(model, block: int) -> bool:
    """Whether block ``block``'s down-projection (or its experts') trains: the warm start edits it,
    and the teacher keeps the source values of the weights that train only."""
    from bakery.arch import spec_for
    from bakery.bakers.rank1 import down_module, experts_of

    spec = spec_for(model.config)
    mod = model.get_submodule(spec.blocks)[block]
    experts = experts_of(spec, mod)
    down = experts if experts is not None else mod.get_submodule(down_module(spec, mod))
    return any(p.requires_grad for p in down.parameters())


def source_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


# ---- the bake ---------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    out: Path | None
    result: TrainResult
    info: dict[str, Any]


@dataclass
class Trained:
    """A finished (or interrupted) training run and what its export needs."""

    distiller: Distiller
    tok: Any
    vec: VectorArtifact
    trait: str
    source: dict[str, Any]
    result: TrainResult
    info: dict[str, Any]
    work: Path


def _close_group_at_exit() -> None:
    """Close the process group of our own launch before the interpreter exits: a gloo group left
    open let a rank abort at exit ("terminate called without an active exception", seen once
    on a fresh clone) after the export was written."""
    import atexit

    import torch.distributed as dist

    def close() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    if not getattr(_close_group_at_exit, "registered", False):
        atexit.register(close)
        _close_group_at_exit.registered = True  # type: ignore[attr-defined]


def train_distilled(req: DistillRequest, *, accelerator=None, on_eval=None, progress: bool = True,
                    stop_after: int | None = None, out: Path | None = None) -> Trained:
    """Sample (or reuse) trajectories from the steered model and train the student on them."""
    from accelerate import Accelerator

    from bakery.models import load_model, load_tokenizer, read_config, resolve_model

    if req.method not in METHODS:
        raise DistillError(f"method must be one of {', '.join(METHODS)}; got '{req.method}'")
    check_teacher_engine(req)
    req.train.method = METHODS[req.method]
    if req.train.method == "full" and req.train.first_block is None:
        # blocks before the steered one compute the same thing in teacher and student
        req.train.first_block = req.layer - 1
    req.train.check()
    model_dir = resolve_model(req.model)
    config = read_config(model_dir)
    refuse_quantized(config)
    out = Path(out or req.out)
    work = Path(req.work_dir) if req.work_dir else out.with_name(out.name + ".work")
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if accelerator is None and acc.num_processes > 1:
        _close_group_at_exit()

    if is_wrapper(config) and req.dtype != "source" and getattr(torch, req.dtype) != source_dtype(config):
        raise DistillError(
            f"dtype={req.dtype}: a multimodal wrapper's export keeps the source checkpoint's dtype "
            f"({source_dtype(config)}), so that its vision tower stays byte for byte; leave dtype at source")
    sharded = fsdp_requested() and acc.num_processes > 1
    tok = load_tokenizer(model_dir, trust_remote_code=req.trust_remote_code)
    targets = None
    if sharded:  # every process builds its shard of the student from the checkpoint, never the whole model
        refuse_unshardable(config, req)
        model, targets = build_sharded_student(model_dir, req.train, device=acc.device, layer=req.layer,
                                               trust_remote_code=req.trust_remote_code)
    else:
        model = load_model(model_dir, trust_remote_code=req.trust_remote_code)
        default_lora_first_block(model, req.train, req.layer)
    base = unwrap_peft(model)
    vec = req.vector if isinstance(req.vector, VectorArtifact) else load_vector(
        req.vector, num_layers=base.config.num_hidden_layers)
    vec.check_model(base.config)
    vec.check_layer(req.layer, for_bake=True)
    trait = req.trait or (vec.trait if vec.trait != "unknown" else Path(str(req.vector)).stem)
    row = vec.row(req.layer)

    def context_for(m):
        return lambda P: steer(m, vec, req.layer, req.coef, positions=req.positions, prompt_len=P)

    # trajectories: the main process samples (or loads), every process reads the same file
    expect = teacher_meta(model_dir, config, vec, req)
    traj_path = Path(req.trajectories) if req.trajectories else work / "trajectories.jsonl"
    if acc.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
    have = traj_path.is_file()
    if have and acc.is_main_process:
        TrajectorySet.load(traj_path).check_matches(expect, where=str(traj_path))
    elif not have and sharded and req.teacher_engine == "transformers":
        pool, _ = build_pool(req)
        sample_sharded(base, tok, pool, context_for(base), req, expect, traj_path, acc, progress=progress)
    elif not have and acc.is_main_process:
        pool, _ = build_pool(req, model, tok, progress=progress)
        t0 = time.perf_counter()
        if req.teacher_engine == "vllm":
            ts = sample_from_bias_bake(req, model_dir, base, tok, vec, trait, pool, expect, work)
        else:
            ts = sample(model, tok, pool, context_for(model), samples_per_prompt=req.samples_per_prompt,
                        max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                        batch_size=req.sample_batch_size, seed=req.train.seed, meta=expect,
                        progress=progress, keep_topk=req.train.teacher_topk)
        ts.meta["sample_seconds"] = round(time.perf_counter() - t0, 1)
        ts.save(traj_path)
    acc.wait_for_everyone()
    ts = TrajectorySet.load(traj_path)
    ts.check_matches(expect, where=str(traj_path))
    n_prompts = len({t.prompt for t in ts.items})
    if n_prompts <= req.val_prompts:
        raise DistillError(
            f"{traj_path} holds trajectories for only {n_prompts} prompts, not more than the "
            f"{req.val_prompts} held back for validation: raise --num-prompts or lower --val-prompts")
    train, val = ts.split(req.val_prompts, seed=req.train.seed)

    def warm_start(m):
        if req.train.method == "lora":  # LoRA components hold the write; it checks the adapter's targets
            return apply_lora_warm_start(m, train.items, tok.pad_token_id, vector=row, layer=req.layer,
                                         coef=req.coef, positions=req.positions, gate=req.train.warm_start_gate)
        if not trains_down(m, req.layer - 1):
            return {"skipped": f"the warm start writes block {req.layer - 1}'s down-projection, which this run "
                               "does not train (target_modules / first_block)"}
        return apply_warm_start(m, train.items, tok.pad_token_id, vector=row, layer=req.layer, coef=req.coef,
                                positions=req.positions, gate=req.train.warm_start_gate)

    d = Distiller(model, tok.pad_token_id, req.train, context_for, accelerator=acc, warm_start=warm_start,
                  targets=targets)
    source = source_info_for(req.model_name or str(req.model), model_dir, config)
    dtype = source_dtype(config) if req.dtype == "source" else getattr(torch, req.dtype)

    def info_now(dd: Distiller, extra: dict | None = None) -> dict:
        # R's scale is the unedited model's KL (a warm-started student's step 0 is already close)
        base_kl = (dd.warm_start_info or {}).get("source_val_kl") or (
            dd.history[0]["val_kl"] if dd.history else float("nan"))
        i = {"steps": dd.step, "best_step": dd.best_step, "best_val_kl": round(dd.best_val, 6),
             "val_kl_base": round(base_kl, 6),
             "val_R": round(1 - dd.best_val / base_kl, 4) if base_kl else None,
             "lr": req.train.resolved_lr(), "lr_schedule": req.train.lr_schedule,
             "teacher_topk": req.train.teacher_topk, "batch_size": req.train.batch_size,
             "train_trajectories": len(train), "train_tokens": train.num_response_tokens,
             "val_trajectories": len(val), "wall_s": round(dd.elapsed, 1), "positions": req.positions,
             "history": dd.history, "processes": acc.num_processes,
             "distributed_type": str(acc.distributed_type).split(".")[-1], "sharding": dd.sharding,
             "activation_checkpointing": req.train.checkpoints_activations(sharded),
             "replicas_in_sync": dd.replicas_in_sync,
             "sample_seconds": ts.meta.get("sample_seconds"),
             "teacher_engine": ts.meta.get("teacher_engine", "transformers"), "vector_norm": round(float(row.norm()), 4)}
        i.update(dd.targets, experts=req.train.experts)
        if req.train.method == "lora":
            i.update(rank=req.train.rank, alpha=req.train.resolved_alpha(), rslora=req.train.rslora)
            if req.train.first_block:
                i.update(first_block=req.train.first_block)
            if dd.warm_start_info is not None:
                i.update(warm_start=dd.warm_start_info)
        else:
            i.update(first_block=req.train.first_block, warm_start=dd.warm_start_info,
                     trained_parameters=sum(p.numel() for p in dd.unwrapped.parameters() if p.requires_grad))
        ws = dd.warm_start_info or {}
        if "block" in ws and dd.history:
            off = ("" if ws["unsteered_mean"] is None
                   else f", {ws['unsteered_mean']:.3f} at unsteered ones")
            where = (f"the down-projections of {ws['experts_fitted']} of block {ws['block']}'s "
                     f"{ws['experts']} experts (one u per expert, fitted on the tokens routed to it)"
                     if "experts" in ws else f"block {ws['block']}'s MLP")
            held = " (LoRA components)" if "lora_components" in ws else ""
            gate = (f"one repurposed MLP neuron (neuron {ws['neuron']}) reading the MLP input with the "
                    f"other neurons" if ws.get("gate") == "neuron" else "u . a")
            i["notes"] = [
                f"warm start: coef * v written through {where}{held}, gated "
                f"by {gate} (mean {ws['steered_mean']:.3f} at steered tokens{off}; {ws['tokens']} "
                f"tokens); validation R {1 - dd.history[0]['val_kl'] / base_kl:.4f} before training, "
                f"{i['val_R']:.4f} at step {dd.best_step}"]
        elif "skipped" in ws:
            i["notes"] = [f"no warm start: {ws['skipped']}"]
        return {**i, **(extra or {})}

    def weights(dd: Distiller, extra: dict | None = None, staging: Path | None = None) -> DistilledWeights | None:
        """Call on every process (a sharded student is written from its shards, every process
        gathering each tensor in turn); ``None`` off the main one."""
        kw = dict(method=req.train.method, dtype=dtype, source=source,
                  term={"layer": req.layer, "coef": req.coef, "trait": trait}, positions=req.positions,
                  model_dir=model_dir, config=config)
        if dd.sharded:
            staging = staging or work / "export-staging"
            stage_sharded(dd.unwrapped, method=req.train.method, dtype=dtype, staging=staging,
                          is_main=acc.is_main_process, progress=progress)
            acc.wait_for_everyone()
            return StagedWeights(staging, info=info_now(dd, extra), **kw) if acc.is_main_process else None
        if not acc.is_main_process:
            return None
        return DistilledWeights(dd.unwrapped, info=info_now(dd, extra), **kw)

    def on_save(dd: Distiller, step: int) -> None:
        from bakery.bakers.distilled import job_for
        from bakery.bakers.export import write_export

        w = weights(dd, {"halfbaked_step": step}, staging=work / f"halfbaked-staging-{step:06d}")
        if w is not None:  # a half-baked export: the same folder as the final one, in the work dir
            write_export(req.job or job_for(req), w, force=True, progress=False,
                         folder=work / "halfbaked" / f"step-{step:06d}")

    result = d.train(train, val, work_dir=work, resume=req.resume, on_eval=on_eval, on_save=on_save,
                     progress=progress, stop_after=stop_after)
    trained = Trained(d, tok, vec, trait, source, result, info_now(d), work)
    trained.weights = lambda: weights(d)  # type: ignore[attr-defined]
    return trained


def bake_distilled(req: DistillRequest, *, accelerator=None, on_eval=None, progress: bool = True,
                   stop_after: int | None = None) -> DistillResult:
    """Sample (or reuse) trajectories, train, export through the one export path; the library
    entry with training hooks (``on_eval``, ``stop_after``, an accelerator). ``out`` is ``None``
    on the non-main processes and for a run stopped before its last step."""
    from bakery.bakers.distilled import job_for
    from bakery.bakers.export import write_export

    req.job = req.job or job_for(req)
    check_output(req.job.out, kind=EXPORT, source=req.job.model_dir, force=req.force)
    t = train_distilled(req, accelerator=accelerator, on_eval=on_eval, progress=progress,
                        stop_after=stop_after, out=req.job.out)
    acc = t.distiller.acc
    if stop_after is not None and t.result.steps < req.train.max_steps and not t.result.stopped_early:
        return DistillResult(None, t.result, t.info)
    w = t.weights()  # type: ignore[attr-defined]
    folder = write_export(req.job, w, force=req.force, progress=progress) if w is not None else None
    acc.wait_for_everyone()
    return DistillResult(folder, t.result, t.info)


