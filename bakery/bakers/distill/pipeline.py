"""The distillation pipeline behind ``kl-lora`` and ``kl-full``: train weights that behave like
the steered model, in named steps called in order by :func:`train_distilled`:

1. :func:`prepare`: the settings (the method's one config, resolved), the student and the vector;
2. :func:`teacher_trajectories`: a diverse prompt pool (held-out questions left out) and the
   trajectories the runtime-steered model samples from it (:mod:`~bakery.bakers.distill.trajectories`),
   or the ones a previous run saved;
3. :func:`warm_start`: the gated rank-one steering write the student starts from
   (:mod:`~bakery.bakers.distill.warm_start`);
4. training on ``KL(steered || student)`` over their response tokens
   (:class:`~bakery.bakers.distill.train.Distiller`);
5. :func:`trained_weights`: the LoRA merged into the base weights plus the peft adapter, or the
   fine-tuned weights, ready for the one export path every baker writes through.

The pipeline is given what it needs from the bakers above it: ``teacher_bake`` (the exact bias
bake a vLLM teacher samples from) and ``write_halfbaked`` (the export of a half-baked checkpoint);
:mod:`bakery.bakers.distilled` passes both. Data-parallel runs go through ``accelerate launch
--multi_gpu``, sharded ones ``--use_fsdp --fsdp_version 2`` (:mod:`~bakery.bakers.distill.sharding`).
"""

from __future__ import annotations

import atexit
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bakery.bakers.distill.config import TEACHER_ENGINES, DistillConfig, train_config
from bakery.bakers.distill.errors import DistillError
from bakery.bakers.distill.export import DistilledWeights, StagedWeights, is_wrapper
from bakery.bakers.distill.prompts import model_written_prompts, prompt_pool, read_prompt_file
from bakery.bakers.distill.report import run_info
from bakery.bakers.distill.sharded_export import stage_sharded
from bakery.bakers.distill.sharded_load import build_sharded_student, refuse_unshardable
from bakery.bakers.distill.sharding import fsdp_requested
from bakery.bakers.distill.targets import unwrap_peft
from bakery.bakers.distill.train import Distiller, TrainResult
from bakery.bakers.distill.train_config import TrainConfig
from bakery.bakers.distill.trajectories import TrajectorySet, sample, sample_vllm
from bakery.bakers.distill.warm_start import apply_lora_warm_start, apply_warm_start, default_lora_first_block
from bakery.bakers.export import source_info_for
from bakery.bakers.request import BakeRequest
from bakery.models import config_hash, load_model, load_tokenizer
from bakery.steering.hooks import steer
from bakery.vectors.artifact import VectorArtifact

# (vector, layer, coef, trait, folder) -> the folder of the exact bias bake of coef * vector[layer]
TeacherBake = Callable[[VectorArtifact, int, float, str, Path], Path]
# (weights, folder): write a half-baked export of the weights into folder
WriteHalfbaked = Callable[[DistilledWeights, Path], None]


@dataclass
class Run:
    """What the steps share: the bake, its resolved settings, the student and the vector."""

    job: BakeRequest
    settings: DistillConfig  # job.cfg with every option's value (given, or the method's default)
    train: TrainConfig
    acc: Any  # accelerate.Accelerator
    work: Path
    sharded: bool
    tok: Any
    model: Any  # the student (peft-wrapped or sharded once the Distiller has it)
    targets: dict | None
    vec: VectorArtifact
    trait: str
    dtype: torch.dtype
    source: dict[str, Any]
    progress: bool = True

    @property
    def layer(self) -> int:
        return self.job.terms[0].layer

    @property
    def coef(self) -> float:
        return float(self.job.terms[0].coef)

    @property
    def row(self) -> torch.Tensor:
        return self.vec.row(self.layer)

    def context_for(self, m):
        """The teacher's steering over model ``m``: ``P -> steer(...)`` for a prompt of length P."""
        return lambda P: steer(m, self.vec, self.layer, self.coef, positions=self.settings.positions, prompt_len=P)

    def teacher_meta(self) -> dict[str, Any]:
        """What trajectories must have been sampled under to be reused by this run."""
        return teacher_meta(self.job.config, self.vec, self.layer, self.coef, self.settings.positions)


def teacher_meta(config: dict, vec: VectorArtifact, layer: int, coef: float, positions: str) -> dict[str, Any]:
    return {"model_config_hash": config_hash(config), "vector_sha256": vec.sha256(), "layer": layer,
            "coef": coef, "positions": positions}


def source_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _close_group_at_exit() -> None:
    """Close the process group of our own launch before the interpreter exits: a gloo group left
    open let a rank abort at exit ("terminate called without an active exception", seen once
    on a fresh clone) after the export was written."""
    import torch.distributed as dist

    def close() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    if not getattr(_close_group_at_exit, "registered", False):
        atexit.register(close)
        _close_group_at_exit.registered = True  # type: ignore[attr-defined]


def check_settings(s: DistillConfig, config: dict) -> None:
    """Settings that cannot work together, refused before any model is loaded."""
    if s.teacher_engine == "vllm" and s.positions != "all":
        raise DistillError(
            "--teacher-engine vllm samples from the exact bias bake, which equals steering at every "
            f"position; positions={s.positions} steering has no such bake. Use --positions all, or "
            f"--teacher-engine {TEACHER_ENGINES[0]} (hooked generation)")
    if is_wrapper(config) and s.dtype != "source" and getattr(torch, s.dtype) != source_dtype(config):
        raise DistillError(
            f"dtype={s.dtype}: a multimodal wrapper's export keeps the source checkpoint's dtype "
            f"({source_dtype(config)}), so that its vision tower stays byte for byte; leave dtype at source")


# ---- 1. prepare ------------------------------------------------------------------------------
def prepare(job: BakeRequest, accelerator=None, *, progress: bool = True) -> Run:
    """The resolved settings, the accelerator, the student (whole, or this process's shard) and
    the vector. ``job`` comes from :func:`bakery.bakers.api.prepare`, which has refused a quantized
    checkpoint and a vector that does not fit the model or the layer."""
    from accelerate import Accelerator

    s = job.cfg.resolved()
    tc = train_config(s)
    if tc.method == "full" and tc.first_block is None:
        tc.first_block = job.terms[0].layer - 1  # blocks before the steered one compute the same in both
    tc.check()
    check_settings(s, job.config)
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if accelerator is None and acc.num_processes > 1:
        _close_group_at_exit()
    sharded = fsdp_requested() and acc.num_processes > 1
    tok = load_tokenizer(job.model_dir, trust_remote_code=s.trust_remote_code)
    t = job.terms[0]
    targets = None
    if sharded:  # every process builds its shard of the student from the checkpoint, never the whole model
        refuse_unshardable(job.config, model_prompts=s.model_prompts)
        model, targets = build_sharded_student(job.model_dir, tc, device=acc.device, layer=t.layer,
                                               trust_remote_code=s.trust_remote_code)
    else:
        model = load_model(job.model_dir, trust_remote_code=s.trust_remote_code)
        default_lora_first_block(model, tc, t.layer)
    out = Path(job.out)
    work = Path(s.work_dir) if s.work_dir else out.with_name(out.name + ".work")
    dtype = source_dtype(job.config) if s.dtype == "source" else getattr(torch, s.dtype)
    return Run(job=job, settings=s, train=tc, acc=acc, work=work, sharded=sharded, tok=tok, model=model,
               targets=targets, vec=t.vector, trait=t.trait, dtype=dtype,
               source=source_info_for(job.model_name, job.model_dir, job.config), progress=progress)


# ---- 2. the teacher's trajectories -------------------------------------------------------------
def build_pool(s: DistillConfig, *, seed: int = 0, model=None, tok=None,
               progress: bool = False) -> tuple[list[str], list[str]]:
    """(training pool, held-out questions). Recipe eval questions and ``held_out`` never train;
    with ``model_prompts`` the (unsteered) ``model`` writes that many questions of its own."""
    from bakery.traits import load_trait_recipe

    extra: list[str] = []
    held = list(s.held_out or [])
    if s.recipe:
        r = load_trait_recipe(s.recipe)
        extra += r.extract_questions
        held += r.eval_questions
    if s.prompts_file:
        extra += read_prompt_file(s.prompts_file)
    if s.model_prompts:
        if model is None:
            raise DistillError("model-written prompts need the model: pass it to build_pool")
        extra += model_written_prompts(model, tok, s.model_prompts, exclude=held + extra, seed=seed,
                                       progress=progress)
    return prompt_pool(s.num_prompts, extra=extra, exclude=held, seed=seed), held


def sample_from_bias_bake(run: Run, teacher_bake: TeacherBake, pool: list[str]) -> TrajectorySet:
    """``positions=all``: the exact bias bake of ``coef * v`` (``teacher_bake``, into
    ``work/teacher-bias``) is the steered teacher; vLLM samples the trajectories from it."""
    from bakery.steering.generation import eos_token_ids

    s = run.settings
    teacher_dir = teacher_bake(run.vec, run.layer, run.coef, run.trait, run.work / "teacher-bias")
    return sample_vllm(teacher_dir, run.tok, pool, samples_per_prompt=s.samples_per_prompt,
                       max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                       seed=run.train.seed, meta=run.teacher_meta(),
                       eos_ids=eos_token_ids(unwrap_peft(run.model), run.tok), keep_topk=run.train.teacher_topk)


def _sample_sharded(run: Run, pool: list[str], path: Path, *, progress: bool) -> None:
    """Sample with a sharded model: each process takes every n-th prompt, generation steps in sync
    (every forward is a collective), and the main process joins the parts into ``path``."""
    s, acc, base = run.settings, run.acc, unwrap_peft(run.model)
    n, rank = acc.num_processes, acc.process_index
    if len(pool) < n:
        raise DistillError(f"{len(pool)} prompts cannot be shared by {n} processes: raise --set num_prompts")
    calls = math.ceil(math.ceil(len(pool) / n) * s.samples_per_prompt / s.sample_batch_size)
    t0 = time.perf_counter()
    part = sample(base, run.tok, pool[rank::n], run.context_for(base), samples_per_prompt=s.samples_per_prompt,
                  max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                  batch_size=s.sample_batch_size, seed=run.train.seed + 7919 * rank, meta=run.teacher_meta(),
                  progress=progress and acc.is_main_process, keep_topk=run.train.teacher_topk, synced_calls=calls)
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


def _sample(run: Run, teacher_bake: TeacherBake, path: Path, *, progress: bool) -> None:
    """One process samples the whole pool (hooked generation, or vLLM on the bias bake)."""
    s = run.settings
    pool, _ = build_pool(s, seed=run.train.seed, model=run.model, tok=run.tok, progress=progress)
    t0 = time.perf_counter()
    if s.teacher_engine == "vllm":
        ts = sample_from_bias_bake(run, teacher_bake, pool)
    else:
        ts = sample(run.model, run.tok, pool, run.context_for(run.model), samples_per_prompt=s.samples_per_prompt,
                    max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                    batch_size=s.sample_batch_size, seed=run.train.seed, meta=run.teacher_meta(),
                    progress=progress, keep_topk=run.train.teacher_topk)
    ts.meta["sample_seconds"] = round(time.perf_counter() - t0, 1)
    ts.save(path)


def teacher_trajectories(run: Run, teacher_bake: TeacherBake, *, progress: bool) -> TrajectorySet:
    """The trajectories of this run's teacher: read from the trajectories file when it holds ones
    sampled under the same model, vector, layer, coef and positions (refused otherwise), else
    sampled and saved there. The main process samples; every process reads the same file."""
    acc, s = run.acc, run.settings
    path = Path(s.trajectories) if s.trajectories else run.work / "trajectories.jsonl"
    if acc.is_main_process:
        run.work.mkdir(parents=True, exist_ok=True)
    have = path.is_file()
    if have and acc.is_main_process:
        TrajectorySet.load(path).check_matches(run.teacher_meta(), where=str(path))
    elif not have and run.sharded and s.teacher_engine == "transformers":
        pool, _ = build_pool(s, seed=run.train.seed)
        _sample_sharded(run, pool, path, progress=progress)
    elif not have and acc.is_main_process:
        _sample(run, teacher_bake, path, progress=progress)
    acc.wait_for_everyone()
    ts = TrajectorySet.load(path)
    ts.check_matches(run.teacher_meta(), where=str(path))
    n_prompts = len({t.prompt for t in ts.items})
    if n_prompts <= s.val_prompts:
        raise DistillError(
            f"{path} holds trajectories for only {n_prompts} prompts, not more than the {s.val_prompts} "
            "held back for validation: raise --set num_prompts=N or lower --set val_prompts=N")
    return ts


# ---- 3. the warm start ------------------------------------------------------------------------
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


def warm_start(run: Run, train: TrajectorySet, student) -> dict:
    """Write the gated steering into ``student`` (LoRA components for kl-lora, which checks the
    adapter's targets; the weights for kl-full) and return what was written."""
    kw = dict(vector=run.row, layer=run.layer, coef=run.coef, positions=run.settings.positions,
              gate=run.train.warm_start_gate)
    pad = run.tok.pad_token_id
    if run.train.method == "lora":
        return apply_lora_warm_start(student, train.items, pad, **kw)
    if not trains_down(student, run.layer - 1):
        return {"skipped": f"the warm start writes block {run.layer - 1}'s down-projection, which this run "
                           "does not train (target_modules / first_block)"}
    return apply_warm_start(student, train.items, pad, **kw)


# ---- 5. the weights to export -------------------------------------------------------------------
def trained_weights(run: Run, d: Distiller, info: dict, staging: Path | None = None) -> DistilledWeights | None:
    """The trained student as weights to write. Call on every process: a sharded student is written
    from its shards, every process gathering each tensor in turn; ``None`` off the main process."""
    t = run.job.terms[0]
    kw = dict(method=run.train.method, dtype=run.dtype, source=run.source,
              term={"layer": t.layer, "coef": t.coef, "trait": run.trait}, positions=run.settings.positions,
              model_dir=run.job.model_dir, config=run.job.config, info=info)
    if d.sharded:
        staging = staging or run.work / "export-staging"
        stage_sharded(d.unwrapped, method=run.train.method, dtype=run.dtype, staging=staging,
                      is_main=run.acc.is_main_process, progress=run.progress)
        run.acc.wait_for_everyone()
        return StagedWeights(staging, **kw) if run.acc.is_main_process else None
    return DistilledWeights(d.unwrapped, **kw) if run.acc.is_main_process else None


# ---- the driver -----------------------------------------------------------------------------------
@dataclass
class Trained:
    """A finished (or interrupted) training run and what its export needs."""

    run: Run
    distiller: Distiller
    result: TrainResult
    info: dict[str, Any]

    def weights(self) -> DistilledWeights | None:
        """The weights to export (every process must call it; ``None`` off the main one)."""
        return trained_weights(self.run, self.distiller, self.info)


def train_distilled(job: BakeRequest, *, teacher_bake: TeacherBake, write_halfbaked: WriteHalfbaked,
                    accelerator=None, on_eval=None, progress: bool = True,
                    stop_after: int | None = None) -> Trained:
    """Prepare, sample (or reuse) the teacher's trajectories, warm-start and train the student."""
    run = prepare(job, accelerator, progress=progress)
    ts = teacher_trajectories(run, teacher_bake, progress=progress)
    train, val = ts.split(run.settings.val_prompts, seed=run.train.seed)
    d = Distiller(run.model, run.tok.pad_token_id, run.train, run.context_for, accelerator=run.acc,
                  warm_start=lambda m: warm_start(run, train, m), targets=run.targets)

    def on_save(dd: Distiller, step: int) -> None:
        info = run_info(run, dd, train, val, ts, {"halfbaked_step": step})
        w = trained_weights(run, dd, info, staging=run.work / f"halfbaked-staging-{step:06d}")
        if w is not None:  # a half-baked export: the same folder as the final one, in the work dir
            write_halfbaked(w, run.work / "halfbaked" / f"step-{step:06d}")

    result = d.train(train, val, work_dir=run.work, resume=run.settings.resume, on_eval=on_eval,
                     on_save=on_save, progress=progress, stop_after=stop_after)
    return Trained(run, d, result, run_info(run, d, train, val, ts))
