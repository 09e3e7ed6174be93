"""The distilled bakers ``kl-lora`` and ``kl-full``: train weights that behave like the steered
model, then export them as an ordinary checkpoint.

Flow: a diverse prompt pool (held-out questions left out) -> trajectories sampled from the
runtime-steered model (:mod:`bakery.bakers.distill.trajectories`) -> ``KL(steered || student)`` training on their
response tokens (:mod:`bakery.bakers.distill.train`) -> export: the LoRA merged into the weights (stock
architecture, no new parameters) plus the peft adapter in ``adapter/``, or for ``kl-full`` the
fine-tuned weights, which start from a gated rank-one steering write (:mod:`bakery.bakers.distill.warm_start`);
then the vector, ``bakery.json`` and a model card. Approximate, but it works on every architecture and engine and is the only bake
that can stand for ``positions=response`` steering.

Run it as ``bakery bake --method kl-lora ...``, ``bakery.bakers.bake("kl-lora", ...)``,
``python -m bakery.bakers.distill.pipeline ...`` or, data-parallel, ``accelerate launch --multi_gpu
--num_processes 2 -m bakery.bakers.distill.pipeline ...`` (on CPU, accelerate's ``--cpu`` starts one process),
or sharded with ``--use_fsdp --fsdp_version 2`` (:mod:`bakery.bakers.distill.sharding`).
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bakery.bakers.base import refuse_quantized
from bakery.io.card import SECTION as CARD_SECTION
from bakery.io.card import body as card_common
from bakery.io.card import front_matter
from bakery.io.checkpoint import atomic_folder, check_output
from bakery.io.export import _slug, source_info_for, vector_file_for
from bakery.bakers.distill.train import Distiller, DistillError, TrainConfig, TrainResult, add_lora, check_targets
from bakery.io.manifest import BakeTerm, Manifest, versions
from bakery.steering.hooks import steer
from bakery.bakers.distill.trajectories import (TrajectorySet, model_written_prompts, prompt_pool, read_prompt_file, sample,
                                 sample_vllm)
from bakery.vectors.artifact import VectorArtifact, describe_layer, load_vector
from bakery.bakers.distill.warm_start import apply_warm_start

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
    from bakery.bakers import bake as run_bake
    from bakery.steering.generation import eos_token_ids

    teacher_dir = run_bake("bias", str(model_dir), [(vec, req.layer, req.coef, trait)], work / "teacher-bias",
                           target_engines="vllm", force=True, progress=False,
                           command="teacher of a distilled bake (--teacher-engine vllm)")
    return sample_vllm(teacher_dir, tok, pool, samples_per_prompt=req.samples_per_prompt,
                       max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                       seed=req.train.seed, meta=meta, eos_ids=eos_token_ids(model, tok),
                       keep_topk=req.train.teacher_topk)


def source_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


# ---- export ---------------------------------------------------------------------------------------
def merged_copy(student, method: str):
    """A plain transformers model with the trained weights (LoRA merged); the student is untouched."""
    m = copy.deepcopy(student)
    if method == "lora":
        m = m.merge_and_unload()
    return m


def write_export(student, tok, out: str | Path, *, method: str, vec: VectorArtifact, layer: int,
                 coef: float, trait: str, positions: str, source: dict, dtype: torch.dtype,
                 train_info: dict, command: str = "", force: bool = False) -> Path:
    """Merged weights, ``adapter/`` (LoRA), vector, ``bakery.json`` and card, atomically.

    The card holds the section every baker writes (:func:`bakery.io.card.body`: what was baked, engine
    support, usage lines naming ``out``, the reproduce command; ``bakery push`` re-renders it with
    the repo id) followed by a ``distill`` section with the training details."""
    from bakery.io.card_sections import write_section

    out = Path(out)
    with atomic_folder(out, force=force) as tmp:
        merged = merged_copy(student, method).to(dtype)
        merged.save_pretrained(tmp)
        del merged
        tok.save_pretrained(tmp)
        if method == "lora":
            student.save_pretrained(tmp / "adapter")
            _fix_adapter_base(tmp / "adapter", source)
        vfile = vector_file_for(trait)
        vec.save(tmp / vfile)
        m = Manifest(method=f"kl-{method}", terms=[BakeTerm(layer, coef, trait, vfile, vec.sha256())],
                     positions=positions, route="lora-merged" if method == "lora" else "full",
                     exact=False, source=source, engines={"transformers": "ok", "vllm": "ok", "sglang": "ok"},
                     versions=versions(), command=command, extra=train_info)
        m.save(tmp)
        fm = front_matter(m)
        fm["tags"].append("distillation")
        (tmp / "README.md").write_text("---\n" + yaml.safe_dump(fm, sort_keys=False) + "---\n\n")
        write_section(tmp, CARD_SECTION, card_common(m, str(out)))
        write_section(tmp, "distill", card_body(m, train_info))
    return out


def _fix_adapter_base(adapter_dir: Path, source: dict) -> None:
    """Point the adapter (config and peft's card) at the source's Hub id, else the name the user
    gave: peft records the local folder it loaded, a cache path that means nothing elsewhere."""
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    local = cfg.get("base_model_name_or_path")
    base = source.get("hub_id") or source.get("model") or local
    cfg["base_model_name_or_path"] = base
    p.write_text(json.dumps(cfg, indent=2))
    card = adapter_dir / "README.md"
    if local and base != local and card.is_file():
        card.write_text(card.read_text().replace(local, base))


def card_body(m: Manifest, info: dict) -> str:
    """The card's ``distill`` section: how the weights were trained and what the folder holds."""
    t = m.terms[0]
    lines = [
        "## Distillation", "",
        f"Runtime steering `{t.coef:g} * v[{t.layer}]` ({describe_layer(t.layer)}), positions "
        f"`{m.positions}`, distilled into the weights by minimising KL(steered || model) on "
        f"{info.get('train_trajectories')} sampled trajectories ({info.get('train_tokens')} response tokens).",
        "", "| setting | value |", "| --- | --- |",
    ]
    for k in ("rank", "alpha", "rslora", "target_modules", "lr", "steps", "best_step", "best_val_kl",
              "val_kl_base", "val_R", "wall_s"):
        if k in info:
            lines.append(f"| {k} | {info[k]} |")
    if m.method == "kl-lora":
        base = m.source.get("hub_id") or m.source.get("model")
        lines += ["", "The weights are a plain checkpoint: the trained LoRA is merged into the base weights "
                  "(stock architecture, no new parameters), so it loads like the base model in "
                  "transformers, vLLM or sglang.", "",
                  "The unmerged peft adapter is in `adapter/` (paths below relative to this folder): "
                  "`PeftModel.from_pretrained(base_model, 'adapter')`, or in vLLM "
                  f"`vllm serve {base} --enable-lora --lora-modules {_slug(t.trait)}=adapter "
                  f"--max-lora-rank {info.get('rank')}`."]
    else:
        first = info.get("first_block")
        which = f"blocks {first} and later" if first is not None else "the target linears"
        lines += ["", f"The weights are a plain checkpoint: full fine-tuning of {which} (no LoRA, no "
                  "adapter, no new parameters), so it loads like the base model in transformers, vLLM "
                  "or sglang."]
    return "\n".join(lines)


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

    model = load_model(model_dir, trust_remote_code=req.trust_remote_code)
    tok = load_tokenizer(model_dir, trust_remote_code=req.trust_remote_code)
    vec = req.vector if isinstance(req.vector, VectorArtifact) else load_vector(
        req.vector, num_layers=model.config.num_hidden_layers)
    vec.check_model(model.config)
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
        if traj_path.is_file():
            TrajectorySet.load(traj_path).check_matches(expect, where=str(traj_path))
        else:
            pool, _ = build_pool(req, model, tok, progress=progress)
            t0 = time.perf_counter()
            if req.teacher_engine == "vllm":
                ts = sample_from_bias_bake(req, model_dir, model, tok, vec, trait, pool, expect, work)
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
        return apply_warm_start(m, train.items, tok.pad_token_id, vector=row, layer=req.layer, coef=req.coef,
                                positions=req.positions)

    d = Distiller(model, tok.pad_token_id, req.train, context_for, accelerator=acc, warm_start=warm_start)
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
             "replicas_in_sync": dd.replicas_in_sync,
             "sample_seconds": ts.meta.get("sample_seconds"),
             "teacher_engine": ts.meta.get("teacher_engine", "transformers"), "vector_norm": round(float(row.norm()), 4)}
        if req.train.method == "lora":
            i.update(rank=req.train.rank, alpha=req.train.resolved_alpha(), rslora=req.train.rslora,
                     target_modules=sorted(dd.unwrapped.peft_config["default"].target_modules))
        else:
            i.update(target_modules=check_targets(dd.unwrapped, req.train.target_modules),
                     first_block=req.train.first_block, warm_start=dd.warm_start_info,
                     trained_parameters=sum(p.numel() for p in dd.unwrapped.parameters() if p.requires_grad))
            ws = dd.warm_start_info or {}
            if "block" in ws and dd.history:
                off = ("" if ws["unsteered_mean"] is None
                       else f", {ws['unsteered_mean']:.3f} at unsteered ones")
                i["notes"] = [
                    f"warm start: coef * v written through block {ws['block']}'s down-projection, gated "
                    f"by u . a (mean {ws['steered_mean']:.3f} at steered tokens{off}; {ws['tokens']} "
                    f"tokens); validation R {1 - dd.history[0]['val_kl'] / base_kl:.4f} before training, "
                    f"{i['val_R']:.4f} at step {dd.best_step}"]
            elif "skipped" in ws:
                i["notes"] = [f"no warm start: {ws['skipped']}"]
        return {**i, **(extra or {})}

    def fresh():  # an untrained student of the same structure, for weights gathered from shards
        m = load_model(model_dir, trust_remote_code=req.trust_remote_code).float()
        return add_lora(m, req.train) if req.train.method == "lora" else m

    def export(dd: Distiller, folder: Path, extra: dict | None = None, force: bool = True) -> Path | None:
        """Call on every process; the main one writes (and returns) the folder."""
        student = dd.plain_student(fresh)
        if student is None:
            return None
        return write_export(student, tok, folder, method=req.train.method, vec=vec, layer=req.layer,
                            coef=req.coef, trait=trait, positions=req.positions, source=source,
                            dtype=dtype, train_info=info_now(dd, extra), command=req.command, force=force)

    def on_save(dd: Distiller, step: int) -> None:
        export(dd, work / "halfbaked" / f"step-{step:06d}", {"halfbaked_step": step})

    result = d.train(train, val, work_dir=work, resume=req.resume, on_eval=on_eval, on_save=on_save,
                     progress=progress, stop_after=stop_after)
    trained = Trained(d, tok, vec, trait, source, result, info_now(d), work)
    trained.export = lambda folder, force=True: export(d, Path(folder), force=force)  # type: ignore[attr-defined]
    return trained


def bake_distilled(req: DistillRequest, *, accelerator=None, on_eval=None, progress: bool = True,
                   stop_after: int | None = None) -> DistillResult:
    """Sample (or reuse) trajectories, train, export. Returns the export folder (main process)."""
    from bakery.models import resolve_model

    out = check_output(req.out, resolve_model(req.model), force=req.force)
    t = train_distilled(req, accelerator=accelerator, on_eval=on_eval, progress=progress,
                        stop_after=stop_after, out=out)
    acc = t.distiller.acc
    if stop_after is not None and t.result.steps < req.train.max_steps and not t.result.stopped_early:
        return DistillResult(None, t.result, t.info)
    folder = t.export(out, force=req.force)  # type: ignore[attr-defined]
    acc.wait_for_everyone()
    return DistillResult(folder, t.result, t.info)


# ---- command line (python -m bakery.bakers.distill.pipeline / accelerate launch -m ...) ---------------------
def _cli():
    import click

    from bakery.cli.common import clear_errors, model_option, trust_option

    @click.command()
    @click.option("--vector", "-v", required=True, type=click.Path(dir_okay=False))
    @click.option("--layer", "-l", type=int, required=True, help="Row L: output of block L-1.")
    @click.option("--coef", "-c", type=float, required=True)
    @click.option("--out", "-o", required=True, type=click.Path(file_okay=False))
    @click.option("--method", type=click.Choice(list(METHODS)), default="kl-lora", show_default=True)
    @click.option("--positions", type=click.Choice(["response", "all"]), default="response", show_default=True)
    @click.option("--recipe", default=None, help="Trait recipe: extraction questions join the pool, "
                  "evaluation questions are held out.")
    @click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False))
    @click.option("--num-prompts", type=int, default=200, show_default=True)
    @click.option("--model-prompts", type=int, default=0, show_default=True,
                  help="Questions the model writes itself, added to the pool.")
    @click.option("--samples-per-prompt", type=int, default=2, show_default=True)
    @click.option("--max-new-tokens", type=int, default=48, show_default=True)
    @click.option("--temperature", type=float, default=1.0, show_default=True)
    @click.option("--top-p", type=float, default=0.95, show_default=True)
    @click.option("--val-prompts", type=int, default=16, show_default=True)
    @click.option("--trajectories", default=None, type=click.Path(dir_okay=False),
                  help="JSONL to reuse (or write, if missing).")
    @click.option("--teacher-engine", type=click.Choice(TEACHER_ENGINES), default="transformers",
                  show_default=True, help="vllm: sample the exact bias bake in vLLM (--positions all).")
    @click.option("--work-dir", default=None, type=click.Path(file_okay=False))
    @click.option("--resume", is_flag=True)
    @click.option("--rank", type=int, default=32, show_default=True)
    @click.option("--alpha", type=float, default=None, help="Default 2 * rank.")
    @click.option("--target-modules", default=None, help="Comma-separated; default all block linears.")
    @click.option("--rslora", is_flag=True)
    @click.option("--teacher-topk", type=int, default=0, show_default=True,
                  help="Keep the teacher's top-K log-probs from sampling and train on them (no teacher "
                  "forward per step); 0: exact teacher forward.")
    @click.option("--lr", type=float, default=None,
                  help="Default 2e-4 (LoRA); full: 1e-5 warm-started, 5e-5 with --no-warm-start.")
    @click.option("--first-block", type=int, default=None,
                  help="kl-full: train blocks from this index on (default: the steered block, layer - 1).")
    @click.option("--warm-start/--no-warm-start", default=True, show_default=True,
                  help="kl-full: start from the gated rank-one steering write (bakery.bakers.distill.warm_start).")
    @click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
                  show_default=True, help="cosine: decay to a tenth of --lr by the last step.")
    @click.option("--batch-size", type=int, default=8, show_default=True)
    @click.option("--steps", "max_steps", type=int, default=100, show_default=True)
    @click.option("--val-every", type=int, default=10, show_default=True)
    @click.option("--patience", type=int, default=3, show_default=True)
    @click.option("--checkpoint-every", type=int, default=20, show_default=True)
    @click.option("--save-every", type=int, default=0, show_default=True, help="Half-baked exports.")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--dtype", type=click.Choice(["source", "float32", "bfloat16", "float16"]), default="source",
                  show_default=True)
    @click.option("--force", is_flag=True)
    @click.option("--no-progress", is_flag=True)
    @model_option
    @trust_option
    @clear_errors
    def main(vector, layer, coef, out, method, positions, recipe, prompts_file, num_prompts, model_prompts,
             samples_per_prompt, max_new_tokens, temperature, top_p, val_prompts, trajectories,
             teacher_engine, work_dir, resume, rank, alpha, target_modules, rslora, teacher_topk, lr, first_block, warm_start, lr_schedule, batch_size, max_steps, val_every, patience,
             checkpoint_every, save_every, seed, dtype, force, no_progress, model, trust_remote_code):
        """Distil runtime steering into weights (kl-lora / kl-full) and export the result."""
        tc = TrainConfig(rank=rank, alpha=alpha, rslora=rslora, lr=lr, lr_schedule=lr_schedule,
                         teacher_topk=teacher_topk, first_block=first_block, warm_start=warm_start,
                         batch_size=batch_size,
                         max_steps=max_steps, val_every=val_every, patience=patience,
                         checkpoint_every=checkpoint_every, save_every=save_every, seed=seed,
                         target_modules=target_modules.split(",") if target_modules else None)
        req = DistillRequest(model=model, vector=vector, layer=layer, coef=coef, out=out, method=method,
                             positions=positions, recipe=recipe, prompts_file=prompts_file,
                             num_prompts=num_prompts, model_prompts=model_prompts,
                             samples_per_prompt=samples_per_prompt,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             val_prompts=val_prompts, trajectories=trajectories, work_dir=work_dir,
                             teacher_engine=teacher_engine,
                             resume=resume, dtype=dtype, force=force, train=tc, trust_remote_code=trust_remote_code,
                             command=shlex.join(["python", "-m", "bakery.bakers.distill.pipeline", *sys.argv[1:]]))
        res = bake_distilled(req, progress=not no_progress)
        if res.out is not None:
            i = res.info
            click.echo(f"{method}: {describe_layer(layer)}, coef {coef:g}, positions {positions}; "
                       f"{i['steps']} steps, best step {i['best_step']}, validation KL "
                       f"{i['val_kl_base']:.4f} -> {i['best_val_kl']:.4f} (R {i['val_R']}), "
                       f"{i['wall_s']:.0f} s on {i['processes']} process(es)")
            click.echo(f"wrote {res.out}")

    return main


if __name__ == "__main__":
    _cli()()


# ---- the registry entry (``bakery bake --method kl-lora|kl-full``) -----------------------------------
_REQUEST_OPTIONS = {f for f in DistillRequest.__dataclass_fields__} - {"model", "vector", "layer", "coef",
                                                                      "out", "method", "train", "command"}
_TRAIN_OPTIONS = set(TrainConfig.__dataclass_fields__) - {"method"}


def request_from_options(method: str, model: str, vector, layer: int, coef: float, out, options: dict,
                         command: str = "") -> DistillRequest:
    """A :class:`DistillRequest` from ``bakery bake`` options (``rank=32, steps=100, ...``)."""
    opts = dict(options)
    if "steps" in opts:
        opts["max_steps"] = opts.pop("steps")
    unknown = sorted(set(opts) - _REQUEST_OPTIONS - _TRAIN_OPTIONS)
    if unknown:
        raise DistillError(f"unknown option(s) for {method}: {', '.join(unknown)}; allowed: "
                           f"{', '.join(sorted((_REQUEST_OPTIONS | _TRAIN_OPTIONS) - {'max_steps'} | {'steps'}))}")
    tc = TrainConfig(**{k: v for k, v in opts.items() if k in _TRAIN_OPTIONS})
    rq = {k: v for k, v in opts.items() if k in _REQUEST_OPTIONS}
    return DistillRequest(model=model, vector=vector, layer=layer, coef=coef, out=out, method=method,
                          train=tc, command=command, **rq)


# options ``bakery bake`` has a flag for; the rest go through ``--set KEY=VALUE``
_BAKE_FLAGS = {"steps": "--steps", "rank": "--rank", "positions": "--positions",
               "teacher_engine": "--teacher-engine"}


def _setting(v: Any) -> str:
    """A value as ``--set`` reads it back (a YAML scalar, or a JSON list)."""
    from bakery.bakers import fmt_float

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return fmt_float(v)
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    s = str(v)
    if isinstance(v, int):
        return s
    try:
        plain = yaml.safe_load(s) == s
    except yaml.YAMLError:
        plain = False
    return s if plain else json.dumps(s)


def reproduce_command(method: str, model_name: str, layer: int, coef: float, out: Path | str, vector: str,
                      options: dict) -> str:
    """The ``bakery bake`` command that redoes a library bake (``bakery.bakers.bake("kl-lora", ...)``)
    from the export's own vector file, every distillation option included."""
    from bakery.bakers import fmt_float

    args = ["bakery", "bake", "--method", method, "--model", model_name, "--vector", vector,
            "--layer", str(layer), "--coef", fmt_float(coef)]
    for k, v in options.items():
        if v is None or k == "force":
            continue
        args += [_BAKE_FLAGS[k], _setting(v)] if k in _BAKE_FLAGS else ["--set", f"{k}={_setting(v)}"]
    return shlex.join([*args, "-o", str(out)])


class _DistillBaker:
    """Registry entry: a distilled bake trains and writes its own folder (merged weights, adapter/,
    vector, manifest, card), so :func:`bakery.bakers.bake` hands it the whole job."""

    name = ""
    needs_coef = True

    def plan(self, req, reader):
        from bakery.bakers.base import BakeError

        raise BakeError(f"{self.name} trains its weights: bake it with bakery.bakers.bake(), which "
                        "calls bake_folder(), not through a streaming plan")

    def bake_folder(self, model_name: str, model_dir: Path, terms: list, out: Path | None, *, force: bool,
                    command: str | None, progress: bool, options: dict[str, Any]) -> Path:
        from bakery.bakers import default_output
        from bakery.bakers.base import BakeError

        if len(terms) != 1:
            raise BakeError(f"{self.name} distils one (vector, layer, coef) term; got {len(terms)}")
        t = terms[0]
        out = Path(out) if out else default_output(model_name, self.name, terms, "", "resid-out", options)
        opts = {k: v for k, v in options.items() if v is not None}
        req = request_from_options(self.name, str(model_dir), t.vector, t.layer, t.coef, out,
                                   {**opts, "force": force}, command=command or "")
        req.trait, req.model_name = t.trait, model_name
        if not req.command:
            req.command = reproduce_command(self.name, model_name, t.layer, t.coef, out,
                                            f"{out}/{vector_file_for(req.trait)}", opts)
        return Path(bake_distilled(req, progress=progress).out)


def _register() -> None:
    from bakery.bakers import register

    for method in METHODS:
        register(method)(type(f"Baker_{method.replace('-', '_')}", (_DistillBaker,), {"name": method}))


_register()
