"""Resumable checkpoints of a distillation run: the trained weights, the optimizer, the best
weights so far and the RNG, written atomically (``work/checkpoint``, the previous one kept until
the new one is complete); sharded runs gather full tensors first."""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from bakery.bakers.distill.errors import TrainingCheckpointError
from bakery.bakers.distill.sharding import full_optimizer_state, full_tensors, like_params, load_full_optimizer_state

CKPT_DIR = "checkpoint"
RESUME_KEYS = ("method", "rank", "alpha", "target_modules", "rslora", "batch_size", "seed", "warm_start", "experts")


def _nbytes(obj) -> int:
    """Bytes of the tensors inside a nested checkpoint object."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


class Checkpoints:
    """Checkpoint methods of :class:`~bakery.bakers.distill.train.Distiller` (a mixin)."""

    def save_checkpoint(self, work_dir: str | os.PathLike) -> Path | None:
        """Write the resumable state to ``work_dir/checkpoint`` atomically (main process only)."""
        self.acc.wait_for_everyone()
        work = Path(work_dir)
        final = work / CKPT_DIR
        if self.sharded:  # full tensors, gathered by every process, written by the main one
            state = {"trainable": full_tensors(self.trainable_state()),
                     "optimizer": full_optimizer_state(self.unwrapped, self.optimizer.optimizer),
                     "best": None if self.best_state is None else full_tensors(self.best_state),
                     "rng": torch.get_rng_state()}
        if not self.acc.is_main_process:
            return None
        tmp, old = work / (CKPT_DIR + ".tmp"), work / (CKPT_DIR + ".old")
        if not self.sharded:
            state = {"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                     "best": self.best_state, "rng": torch.get_rng_state()}
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(state, tmp / "state.pt")
            (tmp / "trainer.json").write_text(json.dumps({
                "step": self.step, "best_val": self.best_val, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "history": self.history, "elapsed": self.elapsed,
                "warm_start": self.warm_start_info,
                "config": asdict(self.cfg)}, indent=1))
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists() and old.exists():
                os.replace(old, final)
            need = _nbytes(state)
            free = shutil.disk_usage(work).free
            full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or free < need
            what = (f"out of disk space ({free / 1e6:.1f} MB free, the checkpoint needs about "
                    f"{need / 1e6:.1f} MB)" if full else f"the write failed ({e})")
            raise TrainingCheckpointError(
                errno.ENOSPC if full else getattr(e, "errno", None) or errno.EIO,
                f"could not write the checkpoint at step {self.step} to {final}: {what}. The "
                "previous checkpoint (if any) is intact; free space or use a work folder on another "
                "disk (--work-dir), then rerun with --resume, or raise --checkpoint-every") from e
        return final

    def load_checkpoint(self, work_dir: str | os.PathLike) -> bool:
        """Restore the state written by :meth:`save_checkpoint`; False if there is none."""
        work = Path(work_dir)
        ck = work / CKPT_DIR
        if not ck.is_dir() and (work / (CKPT_DIR + ".old")).is_dir():
            ck = work / (CKPT_DIR + ".old")  # killed between the two renames
        if not (ck / "state.pt").is_file():
            return False
        meta = json.loads((ck / "trainer.json").read_text())
        saved = meta["config"]
        for key in RESUME_KEYS:
            if saved.get(key, getattr(type(self.cfg)(), key)) != getattr(self.cfg, key):
                raise TrainingCheckpointError(
                    f"cannot resume from {ck}: it was trained with {key}={saved.get(key)!r}, this run "
                    f"has {key}={getattr(self.cfg, key)!r}. Use the same settings, or start afresh "
                    "without --resume (in a new --work-dir)")
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
        if self.sharded:  # the file holds full tensors: lay them out as this process's shards
            self.load_trainable_state(like_params(self.unwrapped, state["trainable"]))
            load_full_optimizer_state(self.unwrapped, self.optimizer.optimizer, state["optimizer"])
            self.best_state = None if state["best"] is None else like_params(self.unwrapped, state["best"])
        else:
            self.load_trainable_state(state["trainable"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.best_state = state["best"]
        torch.set_rng_state(state["rng"])
        self.step, self.best_val, self.best_step = meta["step"], meta["best_val"], meta["best_step"]
        self.bad_evals, self.history, self.elapsed = meta["bad_evals"], meta["history"], meta["elapsed"]
        self.warm_start_info = meta.get("warm_start")
        return True
