"""The distilled bakers ``kl-lora`` and ``kl-full``: their registry entries and the library's
entries with training hooks.

Both train weights against the runtime-steered teacher (:mod:`bakery.bakers.distill.pipeline`)
and write the same export as every baker. Approximate, but they work on every architecture and
engine, and they are the only bakes that can stand for ``positions=response`` steering. Their one
typed config each is in :mod:`bakery.bakers.distill.config`.

A notebook that wants the training hooks (an accelerator, ``on_eval``, ``stop_after``) builds the
bake with :func:`bakery.bakers.api.prepare` and calls :func:`bake_distilled` (or :func:`train`
for the trained student without an export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bakery.bakers.api import bake
from bakery.bakers.base import Baker
from bakery.bakers.distill.config import KlFullConfig, KlLoraConfig
from bakery.bakers.distill.pipeline import Trained, train_distilled
from bakery.bakers.distill.train import TrainResult
from bakery.bakers.export import write_export
from bakery.bakers.plan import Weights
from bakery.bakers.registry import register
from bakery.bakers.request import BakeRequest
from bakery.io.folders import EXPORT, check_output
from bakery.vectors.artifact import VectorArtifact


def teacher_bias_bake(model_dir: Path):
    """The pipeline's ``teacher_bake`` for ``model_dir``: the exact bias bake a vLLM teacher samples
    from (``positions=all``)."""

    def run(vec: VectorArtifact, layer: int, coef: float, trait: str, folder: Path) -> Path:
        return bake("bias", str(model_dir), [(vec, layer, coef, trait)], folder, target_engines="vllm",
                    force=True, progress=False)

    return run


def train(job: BakeRequest, *, accelerator=None, on_eval=None, progress: bool = True,
          stop_after: int | None = None) -> Trained:
    """Train the student of ``job`` (from :func:`bakery.bakers.api.prepare`) without exporting it.
    ``on_eval(distiller, record)`` runs after each validation; ``stop_after`` ends the run after
    that many steps (an interrupted run, resumable with ``resume=True``)."""

    def write_halfbaked(weights: Weights, folder: Path) -> None:
        write_export(job, weights, force=True, progress=False, folder=folder)

    return train_distilled(job, teacher_bake=teacher_bias_bake(job.model_dir),
                           write_halfbaked=write_halfbaked, accelerator=accelerator, on_eval=on_eval,
                           progress=progress, stop_after=stop_after)


@dataclass
class DistillResult:
    out: Path | None  # None off the main process, and for a run stopped before its last step
    result: TrainResult
    info: dict[str, Any]


def bake_distilled(job: BakeRequest, *, force: bool = False, accelerator=None, on_eval=None,
                   progress: bool = True, stop_after: int | None = None) -> DistillResult:
    """Train (:func:`train`) and export through the one export path."""
    check_output(job.out, kind=EXPORT, source=job.model_dir, force=force)
    t = train(job, accelerator=accelerator, on_eval=on_eval, progress=progress, stop_after=stop_after)
    if stop_after is not None and t.result.steps < t.run.train.max_steps and not t.result.stopped_early:
        return DistillResult(None, t.result, t.info)
    w = t.weights()
    folder = write_export(job, w, force=force, progress=progress) if w is not None else None
    t.run.acc.wait_for_everyone()
    return DistillResult(folder, t.result, t.info)


class DistilledBaker(Baker):
    """Train against the steered teacher, then export the merged weights (and adapter)."""

    max_terms = 1

    def build(self, req: BakeRequest, *, progress: bool) -> Weights | None:
        return train(req, progress=progress).weights()


@register("kl-lora")
class KlLoraBaker(DistilledBaker):
    config_class = KlLoraConfig


@register("kl-full")
class KlFullBaker(DistilledBaker):
    config_class = KlFullConfig
