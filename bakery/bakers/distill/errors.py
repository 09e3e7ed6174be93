"""The distillation package's errors (bad input, checkpoints), shared by its modules."""

from __future__ import annotations

from bakery.errors import BakeryError


class DistillError(BakeryError):
    """Bad distillation input (settings, data, modules) with what to do about it."""


class TrainingCheckpointError(OSError, BakeryError):
    """A checkpoint could not be written (disk full) or read; the previous one is intact."""


class TrajectoryError(BakeryError):
    """Bad trajectory input: too few, unreadable, or sampled under other settings."""
