"""The distilled bakers ``kl-lora`` and ``kl-full``: their typed configs and registry entries.

Both train weights against the runtime-steered teacher (:mod:`bakery.bakers.distill.pipeline`)
and write the same export as every baker. Approximate, but they work on every architecture and
engine, and they are the only bakes that can stand for ``positions=response`` steering.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bakery.bakers.registry import register
from bakery.bakers.base import Baker
from bakery.bakers.plan import Weights
from bakery.bakers.request import BakeRequest, Term
from bakery.bakers.config import BakerConfig, option

TEACHER_ENGINES = ("transformers", "vllm")


@dataclass
class DistillConfig(BakerConfig):
    """Settings shared by ``kl-lora`` and ``kl-full``; those without a flag are set with
    ``--set KEY=VALUE``."""

    positions: str | None = option(None, "the positions the steering being baked applies to "
                                   "(default response)", flag="--positions", choices=("response", "all"))
    steps: int | None = option(None, "training steps (default 100)", flag="--steps", kind=int)
    teacher_engine: str | None = option(None, "with --positions all, vllm samples the teacher's "
                                        "trajectories from the exact bias bake in vLLM (default "
                                        "transformers: hooked generation)", flag="--teacher-engine",
                                        choices=TEACHER_ENGINES)
    # the prompt pool and the teacher's trajectories
    recipe: str | None = option(None, "trait recipe: its extraction questions join the pool, its "
                                "evaluation questions are held out", kind=str)
    prompts_file: str | None = option(None, "a file of extra prompts, one a line", kind=str)
    held_out: list | None = option(None, "prompts never trained on", kind=list)
    num_prompts: int | None = option(None, "prompts in the pool (default 200)", kind=int)
    model_prompts: int | None = option(None, "questions the model writes itself (default 0)", kind=int)
    samples_per_prompt: int | None = option(None, "trajectories per prompt (default 2)", kind=int)
    max_new_tokens: int | None = option(None, "tokens per trajectory (default 48)", kind=int)
    temperature: float | None = option(None, "sampling temperature (default 1.0)", kind=float)
    top_p: float | None = option(None, "nucleus sampling (default 0.95)", kind=float)
    sample_batch_size: int | None = option(None, "sampling batch (default 16)", kind=int)
    val_prompts: int | None = option(None, "prompts held back for validation (default 16)", kind=int)
    trajectories: str | None = option(None, "a trajectories JSONL to reuse (written if missing)", kind=str)
    teacher_topk: int | None = option(None, "train on the teacher's top-K log-probs kept from sampling "
                                      "(default 0: an exact teacher forward)", kind=int)
    # training
    lr: float | None = option(None, "learning rate (default: warm-started LoRA 1e-4, kl-full 1e-5; from "
                              "scratch LoRA 2e-4, kl-full 5e-5)", kind=float)
    lr_schedule: str | None = option(None, "constant (default) or cosine", choices=("constant", "cosine"))
    lr_floor: float | None = option(None, "cosine: the last step's fraction of lr (default 0.1)", kind=float)
    batch_size: int | None = option(None, "global batch (default 8)", kind=int)
    val_every: int | None = option(None, "steps between validations (default 10)", kind=int)
    patience: int | None = option(None, "validations without improvement before stopping (default 3)", kind=int)
    min_delta: float | None = option(None, "improvement that counts (default 0)", kind=float)
    grad_clip: float | None = option(None, "gradient clipping norm (default 1.0)", kind=float)
    weight_decay: float | None = option(None, "AdamW weight decay (default 0)", kind=float)
    target_modules: list | None = option(None, "linears to train (default: every linear of the blocks)",
                                         kind=list)
    experts: str | None = option(None, "mixture-of-experts blocks: the experts' fused weights to train: "
                                 "down (default: each expert's down-projection), all (also gate_up), none",
                                 choices=("down", "all", "none"))
    activation_checkpointing: bool | None = option(
        None, "keep only each block's input in the forward pass and recompute the rest in the backward "
        "(less memory for about a third more compute; default: true under FSDP, false otherwise)", kind=bool)
    seed: int | None = option(None, "sampling and training seed (default 0)", kind=int)
    min_trajectories: int | None = option(None, "fewest training trajectories (default 16)", kind=int)
    # the run
    checkpoint_every: int | None = option(None, "steps between resumable checkpoints (default 20)", kind=int)
    save_every: int | None = option(None, "steps between half-baked exports (default 0: none)", kind=int)
    work_dir: str | None = option(None, "checkpoints and trajectories (default OUT.work)", kind=str)
    resume: bool | None = option(None, "continue from the last checkpoint in the work dir", kind=bool)
    dtype: str | None = option(None, "export dtype (default source)",
                               choices=("source", "float32", "bfloat16", "float16"))
    trust_remote_code: bool | None = option(None, "run code shipped with the model", kind=bool)

    def check(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        if isinstance(self.held_out, str):
            self.held_out = [self.held_out]
        super().check()


@dataclass
class KlLoraConfig(DistillConfig):
    """``--method kl-lora``: a LoRA adapter trained by KL distillation, merged for export."""

    rank: int | None = option(None, "LoRA rank (default 32)", flag="--rank", kind=int)
    alpha: float | None = option(None, "LoRA alpha (default 2 * rank)", kind=float)
    rslora: bool | None = option(None, "rank-stabilised LoRA scaling", kind=bool)
    first_block: int | None = option(None, "LoRA on blocks from this index on (default: the steered block, "
                                     "layer - 1, when the warm start applies; else every block)", kind=int)
    warm_start: bool | None = option(None, "start with LoRA components of the steered block's MLP holding "
                                     "the gated steering write (default true; lr then defaults to 1e-4)",
                                     kind=bool)
    warm_start_gate: str | None = option(None, "the warm start's gate: neuron (one repurposed MLP neuron "
                                         "reads the MLP input too), linear (u . a), auto (default: neuron "
                                         "where the MLP allows it)", choices=("auto", "neuron", "linear"))


@dataclass
class KlFullConfig(DistillConfig):
    """``--method kl-full``: full weights trained by KL distillation from a closed-form warm start."""

    first_block: int | None = option(None, "train blocks from this index on (default: the steered "
                                     "block, layer - 1)", kind=int)
    warm_start: bool | None = option(None, "start from the gated steering write (default true)",
                                     kind=bool)
    warm_start_gate: str | None = option(None, "the warm start's gate: neuron (one repurposed MLP neuron "
                                         "reads the MLP input too), linear (u . a), auto (default: neuron "
                                         "where the MLP allows it)", choices=("auto", "neuron", "linear"))


_RENAMED = {"steps": "max_steps"}  # config name -> TrainConfig name


def request_for(job: BakeRequest):
    """The training run (:class:`~bakery.bakers.distill.pipeline.DistillRequest`) of a bake."""
    from bakery.bakers.distill.pipeline import DistillRequest
    from bakery.bakers.distill.train_config import TrainConfig

    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = job.cfg.given()
    train = {_RENAMED.get(k, k): v for k, v in given.items() if _RENAMED.get(k, k) in train_names}
    rest = {k: v for k, v in given.items() if _RENAMED.get(k, k) not in train_names}
    t = job.terms[0]
    return DistillRequest(model=str(job.model_dir), vector=t.vector, layer=t.layer, coef=t.coef,
                          out=job.out, method=job.method, model_name=job.model_name, trait=t.trait,
                          train=TrainConfig(**train), command=job.command, job=job, **rest)


def job_for(req) -> BakeRequest:
    """The bake of a training run built by hand (the library's ``bake_distilled``): its config
    holds every setting that differs from the defaults, so its manifest and reproduce command
    are those of ``bakery bake``."""
    from bakery.bakers.api import reproduce_command
    from bakery.bakers.registry import get_baker, make_config
    from bakery.bakers.distill.pipeline import DistillRequest
    from bakery.bakers.distill.train_config import TrainConfig
    from bakery.models import read_config, resolve_model
    from bakery.vectors.artifact import VectorArtifact
    from bakery.vectors.load import load_vector

    baker = get_baker(req.method)
    names = baker.config_class.option_names()
    req_defaults = {f.name: f.default for f in dataclasses.fields(DistillRequest)
                    if f.default is not dataclasses.MISSING}
    train_defaults = TrainConfig()
    options: dict[str, Any] = {}
    for name in names:
        tname = _RENAMED.get(name, name)
        if hasattr(train_defaults, tname):
            v, d = getattr(req.train, tname), getattr(train_defaults, tname)
        else:
            v, d = getattr(req, name), req_defaults.get(name, [])
        if v != d:
            options[name] = v
    model_dir = resolve_model(req.model)
    config = read_config(model_dir)
    vec = req.vector if isinstance(req.vector, VectorArtifact) else load_vector(
        req.vector, num_layers=int(config.get("num_hidden_layers") or 0) or None)
    path = None if isinstance(req.vector, VectorArtifact) else Path(req.vector)
    job = BakeRequest(model_dir=model_dir, model_name=req.model_name or str(req.model), config=config,
                      terms=[Term(vec, req.layer, req.coef, req.trait, path)], method=req.method,
                      cfg=make_config(req.method, options), out=Path(req.out))
    job.command = reproduce_command(job, baker)
    req.command = job.command
    return job


class DistilledBaker(Baker):
    """Train against the steered teacher, then export the merged weights (and adapter)."""

    max_terms = 1

    def build(self, req: BakeRequest, *, progress: bool) -> Weights | None:
        from bakery.bakers.distill.pipeline import train_distilled

        trained = train_distilled(request_for(req), progress=progress, out=req.out)
        return trained.weights()  # type: ignore[attr-defined]


@register("kl-lora")
class KlLoraBaker(DistilledBaker):
    config_class = KlLoraConfig


@register("kl-full")
class KlFullBaker(DistilledBaker):
    config_class = KlFullConfig
