"""The one typed config of each distilled method (``kl-lora``, ``kl-full``): every option of the
bake, its flag or ``--set`` key, and the value used when it is not given. The training loop's own
settings (:class:`~bakery.bakers.distill.train_config.TrainConfig`) are derived from it, one way."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bakery.bakers.config import BakerConfig, option
from bakery.bakers.distill.train_config import TrainConfig

METHODS = {"kl-lora": "lora", "kl-full": "full"}  # method -> TrainConfig.method
TEACHER_ENGINES = ("transformers", "vllm")


@dataclass
class DistillConfig(BakerConfig):
    """Settings shared by ``kl-lora`` and ``kl-full``; those without a flag are set with
    ``--set KEY=VALUE``."""

    positions: str | None = option(None, "the positions the steering being baked applies to",
                                   flag="--positions", choices=("response", "all"), unset="response")
    steps: int | None = option(None, "training steps (default 100)", flag="--steps", kind=int)
    teacher_engine: str | None = option(None, "with --positions all, vllm samples the teacher's "
                                        "trajectories from the exact bias bake in vLLM; transformers: "
                                        "hooked generation", flag="--teacher-engine",
                                        choices=TEACHER_ENGINES, unset="transformers")
    # the prompt pool and the teacher's trajectories
    recipe: str | None = option(None, "trait recipe: its extraction questions join the pool, its "
                                "evaluation questions are held out", kind=str)
    prompts_file: str | None = option(None, "a file of extra prompts, one a line", kind=str)
    held_out: list | None = option(None, "prompts never trained on", kind=list, unset=[])
    num_prompts: int | None = option(None, "prompts in the pool", kind=int, unset=200)
    model_prompts: int | None = option(None, "questions the model writes itself", kind=int, unset=0)
    samples_per_prompt: int | None = option(None, "trajectories per prompt", kind=int, unset=2)
    max_new_tokens: int | None = option(None, "tokens per trajectory", kind=int, unset=48)
    temperature: float | None = option(None, "sampling temperature", kind=float, unset=1.0)
    top_p: float | None = option(None, "nucleus sampling", kind=float, unset=0.95)
    sample_batch_size: int | None = option(None, "sampling batch", kind=int, unset=16)
    val_prompts: int | None = option(None, "prompts held back for validation", kind=int, unset=16)
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
    resume: bool | None = option(None, "continue from the last checkpoint in the work dir", kind=bool,
                                 unset=False)
    dtype: str | None = option(None, "export dtype", choices=("source", "float32", "bfloat16", "float16"),
                               unset="source")
    trust_remote_code: bool | None = option(None, "run code shipped with the model", kind=bool, unset=False)

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


def train_config(cfg: DistillConfig) -> TrainConfig:
    """The training loop's settings: the options of ``cfg`` that it reads (given ones only; the
    rest keep the loop's defaults)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {_RENAMED.get(k, k): v for k, v in cfg.given().items()}
    return TrainConfig(method=METHODS[cfg.method], **{k: v for k, v in given.items() if k in names})
