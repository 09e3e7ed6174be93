"""Small statistics shared by extraction and fidelity reports."""

from __future__ import annotations

from typing import Iterable


def mean_of(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are present (``None`` skipped); ``None`` when none is."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
