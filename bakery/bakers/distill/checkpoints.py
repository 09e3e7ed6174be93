"""Resumable checkpoints of a distillation run: the trained weights, the optimizer, the best
weights so far and the RNG, written atomically (``work/checkpoint``, the previous one kept until
the new one is complete). A sharded run writes its shards with ``torch.distributed.checkpoint``
(each process its own part, nobody gathers the whole), and resumes from them with any number of
processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from bakery.bakers.distill.errors import TrainingCheckpointError
CKPT_DIR = "checkpoint"
SHARDS = "shards"  # the torch.distributed.checkpoint folder of a sharded run
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

    def _sharded_state(self, best: bool) -> dict:
        """This process's shards of the resumable state (DTensors), for ``torch.distributed.checkpoint``."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        st = {"trainable": self.trainable_state(),
              "optimizer": get_optimizer_state_dict(self.unwrapped, self.optimizer)}
        if best:
            st["best"] = self.best_state if self.best_state is not None else self.trainable_state()
        return st

    def save_checkpoint(self, work_dir: str | os.PathLike) -> Path | None:
        """Write the resumable state to ``work_dir/checkpoint`` atomically (every process calls it;
        sharded, each writes its own shards)."""
        self.acc.wait_for_everyone()
        work = Path(work_dir)
        final = work / CKPT_DIR
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            tmp = work / (CKPT_DIR + ".tmp")
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.acc.wait_for_everyone()
            dcp.save(self._sharded_state(best=self.best_state is not None), checkpoint_id=str(tmp / SHARDS))
            self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        tmp, old = work / (CKPT_DIR + ".tmp"), work / (CKPT_DIR + ".old")
        state = ({"rng": torch.get_rng_state()} if self.sharded else
                 {"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                  "best": self.best_state, "rng": torch.get_rng_state()})
        try:
            if not self.sharded:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            torch.save(state, tmp / "state.pt")
            (tmp / "trainer.json").write_text(json.dumps({
                "step": self.step, "best_val": self.best_val, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "history": self.history, "elapsed": self.elapsed,
                "warm_start": self.warm_start_info, "sharded": self.sharded,
                "has_best": self.best_state is not None, "config": asdict(self.cfg)}, indent=1))
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
        if meta.get("sharded", False) != self.sharded:
            how = ("under accelerate launch --use_fsdp (it was written by a sharded run)" if meta.get("sharded")
                   else "without --use_fsdp (it was written by a run that was not sharded)")
            raise TrainingCheckpointError(f"cannot resume from {ck} this way: resume {how}, or start afresh "
                                          "without --resume (in a new --work-dir)")
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
        if self.sharded:  # each process reads its own shards, in whatever layout they were written
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            st = self._sharded_state(best=meta.get("has_best", False))
            dcp.load(st, checkpoint_id=str(ck / SHARDS))
            self.load_trainable_state(st["trainable"])
            set_optimizer_state_dict(self.unwrapped, self.optimizer, st["optimizer"])
            self.best_state = st.get("best")
        else:
            self.load_trainable_state(state["trainable"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.best_state = state["best"]
        torch.set_rng_state(state["rng"])
        self.step, self.best_val, self.best_step = meta["step"], meta["best_val"], meta["best_step"]
        self.bad_evals, self.history, self.elapsed = meta["bad_evals"], meta["history"], meta["elapsed"]
        self.warm_start_info = meta.get("warm_start")
        return True
