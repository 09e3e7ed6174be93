"""The training loop's settings (:class:`TrainConfig`), resolved from a distilled method's config,
and their checks: learning rate by method and warm start, schedule, LoRA rank, experts, gate."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from bakery.bakers.distill.errors import DistillError
from bakery.bakers.distill.targets import EXPERT_CHOICES
from bakery.bakers.neuron_gate import GATES

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
METHODS = ("lora", "full")
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    method: str = "lora"  # lora | full
    rank: int = 32
    alpha: float | None = None  # default 2 * rank
    target_modules: list[str] | None = None  # default: every linear in the blocks
    rslora: bool = False
    lr: float | None = None  # default 2e-4 for LoRA; full: 1e-5 warm-started, 5e-5 from the source
    lr_schedule: str = "constant"  # constant | cosine (decays to lr_floor * lr at max_steps)
    lr_floor: float = 0.1
    batch_size: int = 8  # global batch (split over processes)
    max_steps: int = 100
    val_every: int = 10
    patience: int = 3  # evaluations without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0
    checkpoint_every: int = 20  # 0 = no checkpoints
    save_every: int = 0  # 0 = no half-baked exports
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    first_block: int | None = None  # train blocks from this index on (default: the steered block when warm-started)
    seed: int = 0
    min_trajectories: int = 16
    teacher_topk: int = 0  # >0: train on the teacher's top-k kept from sampling, no teacher forward
    warm_start: bool | None = None  # start from the gated steering write (default true)
    warm_start_gate: str = "auto"  # the write's gate: auto | neuron | linear (warm_start.fit_write)
    experts: str = "down"  # MoE blocks: fused expert weights to train (down | all | none; targets.py)
    # recompute each block's activations in the backward pass (default: on when sharded, where
    # memory is the point, off otherwise)
    activation_checkpointing: bool | None = None

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        # the warm start is already close: a small step refines it, a large one adds noise
        if self.method == "lora":
            return 1e-4 if self.uses_warm_start() else 2e-4
        return 1e-5 if self.uses_warm_start() else 5e-5

    def uses_warm_start(self) -> bool:
        return self.warm_start if self.warm_start is not None else True

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): a pure function of the step, so a resumed
        run follows the same schedule without saving scheduler state."""
        lr = self.resolved_lr()
        if self.lr_schedule == "constant":
            return lr
        t = min(step / max(self.max_steps - 1, 1), 1.0)
        return lr * (self.lr_floor + (1 - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * t)))

    def checkpoints_activations(self, sharded: bool) -> bool:
        return self.activation_checkpointing if self.activation_checkpointing is not None else sharded

    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    def check(self) -> None:
        if self.method not in METHODS:
            raise DistillError(f"method must be one of {', '.join(METHODS)}; got '{self.method}'")
        if self.lr_schedule not in SCHEDULES:
            raise DistillError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}; got '{self.lr_schedule}'")
        if self.method == "lora":
            if self.rank < 1:
                raise DistillError(f"--rank must be at least 1; got {self.rank}")
            if self.rank not in VLLM_LORA_RANKS:
                warnings.warn(
                    f"LoRA rank {self.rank} cannot be served by vLLM as a LoRA (it allows "
                    f"{', '.join(map(str, VLLM_LORA_RANKS))}); the merged export still works "
                    "everywhere, only adapter/ will not load in vLLM with --enable-lora",
                    stacklevel=2)
        if self.experts not in EXPERT_CHOICES:
            raise DistillError(f"experts must be one of {', '.join(EXPERT_CHOICES)}; got '{self.experts}'")
        if self.warm_start_gate not in GATES:
            raise DistillError(f"warm_start_gate must be one of {', '.join(GATES)}; got '{self.warm_start_gate}'")
        if self.warm_start_gate != "auto" and not self.uses_warm_start():
            raise DistillError(f"warm_start_gate={self.warm_start_gate} is the warm start's gate, and this run "
                               "has warm_start=false: drop one of the two")
        for name in ("batch_size", "max_steps", "val_every"):
            if getattr(self, name) < 1:
                raise DistillError(f"--{name.replace('_', '-')} must be at least 1")
