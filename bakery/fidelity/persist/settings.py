"""What a persistence run is: its settings, the conditions it traces, and its result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bakery.errors import BakeryError

UNSTEERED, SWITCH, STEERED, BAKED = "unsteered", "steer-then-free", "steered", "baked"
CONDITIONS = (UNSTEERED, SWITCH, STEERED, BAKED)
DEFAULT_PROMPTS = (
    "How do I cook rice?",
    "Tell me about the weather today.",
    "What should I do on a free afternoon?",
    "Explain how a bicycle works.",
)


class PersistError(BakeryError):
    """Persistence settings or prompts that cannot be run."""


@dataclass
class PersistSettings:
    """What one persistence run does (the layer is row ``L`` = output of block ``L-1``)."""

    layer: int
    coef: float
    steer_tokens: int
    sample_tokens: int
    temperature: float = 0.7
    seeds: tuple[int, ...] = (0,)
    suppress_eos: bool = True
    system: str | None = None
    batch_size: int | None = 8  # None: as many as fit the device's free memory (8 on the CPU)

    def validate(self) -> None:
        for name, value in (("steer-tokens", self.steer_tokens), ("sample-tokens", self.sample_tokens)):
            if not isinstance(value, int) or value < 1:
                raise PersistError(f"--{name} must be a positive number of tokens; got {value}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise PersistError(f"--temperature must be 0 (greedy) or positive; got {self.temperature}")
        if not self.seeds:
            raise PersistError("give at least one seed")
        if self.batch_size is not None and self.batch_size < 1:
            raise PersistError(f"--batch-size must be positive; got {self.batch_size}")
        if not math.isfinite(self.coef):
            raise PersistError(f"--coef must be a finite number; got {self.coef}")

    @property
    def total_tokens(self) -> int:
        return self.steer_tokens + self.sample_tokens


@dataclass
class Trace:
    """One generated continuation and its per-token projections (``None`` after end of sequence)."""

    condition: str
    prompt_index: int
    prompt: str
    seed: int
    steered_tokens: int  # how many of the first generated tokens were sampled under runtime steering
    token_ids: list[int]
    tokens: list[str]
    projection: list[float | None]
    injected: list[float]  # projection of the steering term itself: coef*|v| while on, else 0
    text_steered_phase: str = ""
    text_free_phase: str = ""

    @property
    def own(self) -> list[float | None]:
        """Projection minus the steering term: what the model itself puts along ``v``."""
        return [None if p is None else p - i for p, i in zip(self.projection, self.injected)]


@dataclass
class PersistResult:
    settings: PersistSettings
    info: dict[str, Any]
    traces: list[Trace]
    summary: dict[str, Any] = field(default_factory=dict)


