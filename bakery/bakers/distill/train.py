"""Training loop of the distilled bakers: minimise ``KL(steered teacher || student)`` on the
response tokens of sampled trajectories.

- LoRA (peft) keeps ONE copy of the model: the teacher is the same model with the adapter switched
  off (``disable_adapter()``) and the steering hook on. Forgetting the switch would make the
  teacher include the adapter, silently; :meth:`Distiller.teacher_hidden` is the one place that
  runs the teacher, and a test pins it to the unadapted model.
- The forward stops before the head: the loss applies the head to a few response rows at a time
  (:mod:`bakery.bakers.distill.head`), so no ``[tokens, vocab]`` tensor is ever whole.
- Full fine-tuning needs the source values of the weights that train (the student's own move):
  only those are kept, and the teacher's forward runs the student with them swapped in
  (:meth:`Distiller.teacher_weights`), so no second model exists. It starts from the closed-form
  warm start (:mod:`bakery.bakers.distill.warm_start`) when one is given: Adam's per-weight steps
  are too small to build the steering write itself in a few hundred steps.
- Validation KL on held-out trajectories with early stopping (the best weights are kept), a
  progress bar with loss and validation KL, checkpoints every N steps with ``resume``, and a
  callback for half-baked exports.
- Runs unchanged under ``accelerate launch`` (data parallel): each process takes its share of the
  global batch, gradients are averaged by the wrapper, only the main process writes. Sharded
  (FSDP2) students are built by :mod:`bakery.bakers.distill.sharded_load`.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bakery.bakers.distill.checkpoints import Checkpoints
from bakery.bakers.distill.errors import TrainingCheckpointError
from bakery.bakers.distill.head import head_function, hidden_as_logits, rows_per_chunk
from bakery.bakers.distill.lora import add_lora
from bakery.bakers.distill.losses import chunked_kl
from bakery.bakers.distill.sharding import checkpoint_blocks, fsdp_requested, is_sharded, local, shard_blocks
from bakery.bakers.distill.targets import full_parameters, lora_targets
from bakery.bakers.distill.train_config import TrainConfig
from bakery.bakers.distill.errors import TrajectoryError
from bakery.bakers.distill.trajectories import Trajectory, TrajectorySet, collate, collate_topk, require_topk
from bakery.fidelity.metrics import response_logits

ContextFactory = Callable[[int | None], ContextManager]

@dataclass
class TrainResult:
    steps: int
    best_step: int
    best_val_kl: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


@torch.no_grad()
def _swap(params: dict[str, nn.Parameter], other: dict[str, torch.Tensor]) -> None:
    """Exchange the values of ``params[n]`` and ``other[n]`` in place, one tensor at a time (local
    shards when sharded: an FSDP all-gather reads the shard's storage)."""
    for n, t in other.items():
        a, b = local(params[n]), local(t)
        tmp = a.clone()
        a.copy_(b)
        b.copy_(tmp)


class Distiller(Checkpoints):
    """Owns the student (and, for full fine-tuning, the source values of its trained weights) and
    trains it.

    ``context_for(m)`` builds the steering of the teacher over model ``m``'s blocks
    (``lambda P: steer(m, vec, L, coef, positions=..., prompt_len=P)``); the teacher is the base
    model (adapter off) or, for full fine-tuning, the student with the source values swapped in.
    """

    def __init__(self, model: nn.Module, pad_id: int, cfg: TrainConfig,
                 context_for: Callable[[nn.Module], ContextFactory], *, accelerator=None,
                 warm_start: Callable[[nn.Module], dict] | None = None, targets: dict | None = None):
        cfg.check()
        from accelerate import Accelerator

        self.cfg = cfg
        self.pad_id = pad_id
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.context_for = context_for
        self.warm_start_info: dict | None = None
        torch.manual_seed(cfg.seed)
        model.float().eval()  # distillation runs in float32; no dropout in teacher or student
        for p in model.parameters():
            p.requires_grad_(False)
        # what trains and what does not, read before peft wraps the target linears (``targets``: a
        # sharded student comes wrapped already, described before)
        self.targets = targets or lora_targets(model, cfg.target_modules, cfg.experts).describe(
            model, lora=cfg.method == "lora")
        self.teacher = None  # a separate teacher model (bench/distill.py's two-copy baseline only)
        self.teacher_state: dict[str, torch.Tensor] = {}
        self._as_teacher = False
        if cfg.method == "lora":
            self.student = model if hasattr(model, "peft_config") else add_lora(model, cfg)
            if hasattr(model, "peft_config"):  # the sharded student: its LoRA is there, trainable
                for n, p in model.named_parameters():
                    p.requires_grad_(".lora_" in n)
            self.teacher_ctx = context_for(self.student.get_base_model())
        else:
            self.student = model
            for p in full_parameters(model, cfg.target_modules, cfg.first_block or 0, cfg.experts):
                p.requires_grad_(True)
            self.teacher_ctx = context_for(self.student)
        # FSDP asked for: bakery shards with FSDP2 itself, on GPUs too (accelerate's plugin would
        # shard a whole model loaded in every process; on CPU it silently runs data parallel),
        # unless the model came sharded already (bakery.bakers.distill.sharded_load)
        self.sharding: str | None = None
        kind = str(self.acc.distributed_type).split(".")[-1]
        shard = fsdp_requested() and self.acc.num_processes > 1
        if cfg.checkpoints_activations(shard) and not is_sharded(self.student):
            checkpoint_blocks(self.student)
        if shard:
            if not is_sharded(self.student):
                shard_blocks(self.student)
            self.sharding = f"FSDP2 by bakery (accelerate runs {kind})"
        if cfg.method == "full":
            # the teacher is the student with the source values of the weights that move: only
            # those are kept (this process's shards when sharded), never a second model
            self.teacher_state = {n: p.detach().clone() for n, p in self.student.named_parameters()
                                  if p.requires_grad}
        if warm_start is not None and cfg.uses_warm_start():
            self.warm_start_info = warm_start(self.student)
            if "skipped" in self.warm_start_info:  # train from the source: its default lr
                cfg.warm_start = False
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.resolved_lr(), weight_decay=cfg.weight_decay)
        if self.sharding:  # no wrapper around a sharded model: FSDP reduces the gradients itself
            self.wrapped, self.optimizer = self.student, optimizer
        else:
            self.wrapped, self.optimizer = self.acc.prepare(self.student, optimizer)
        self.sharded = is_sharded(self.unwrapped)
        self.step = 0
        self.best_val = math.inf
        self.best_step = 0
        self.bad_evals = 0
        self.history: list[dict[str, Any]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self.elapsed = 0.0
        self._val_teacher: list[torch.Tensor] | None = None
        self.replicas_in_sync: bool | None = None

    # ---- model views -------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.wrapped)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trained weights (this process's shards when sharded)."""
        return {n: p.detach().clone() for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.unwrapped.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise TrainingCheckpointError(f"checkpoint holds parameters this model lacks: {missing[:3]}...")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    @contextmanager
    def teacher_weights(self):
        """Within: the student holds the teacher's (source) values of the weights that train, in
        place, one tensor at a time (no second model, no second copy of the trained weights).
        Forwards only: a graph built before entering must not be used after (its weights changed)."""
        if not self.teacher_state or self._as_teacher:
            yield
            return
        params = dict(self.unwrapped.named_parameters())
        self._as_teacher = True
        _swap(params, self.teacher_state)
        try:
            yield
        finally:
            _swap(params, self.teacher_state)
            self._as_teacher = False

    def source_weights(self):
        """Within: the student computes what the unedited source model does (LoRA: the adapter
        off; full fine-tuning: the source values swapped in)."""
        return self.unwrapped.disable_adapter() if self.cfg.method == "lora" else self.teacher_weights()

    # ---- forwards ------------------------------------------------------------------------------
    def _hidden(self, model, ids, mask, P) -> torch.Tensor:
        """The final hidden states at the positions that predict response tokens, [N, hidden]:
        the forward stops before the head (the loss applies it a chunk at a time)."""
        kept = ids.shape[1] - P + 1
        dev = self.acc.device
        with hidden_as_logits(self.acc.unwrap_model(model)):
            # no KV cache: nothing reads it, and a recomputed (checkpointed) block would append to it twice
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=kept, use_cache=False)
        return response_logits(out.logits, mask, P, kept)

    @torch.no_grad()
    def teacher_hidden(self, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        """Response-position final hidden states of the steered teacher: the base model (adapter
        OFF for LoRA, the source values of the trained weights for full fine-tuning), steered.
        The head, norm and embeddings never train, so teacher and student share the head."""
        if self.teacher is not None:
            with self.teacher_ctx(P):
                return self._hidden(self.teacher, ids, mask, P)
        if self.cfg.method == "lora":
            peft_model = self.unwrapped
            with peft_model.disable_adapter(), self.teacher_ctx(P):
                return self._hidden(peft_model, ids, mask, P)
        with self.teacher_weights(), self.teacher_ctx(P):
            return self._hidden(self.unwrapped, ids, mask, P)

    def kl_sum(self, student_h: torch.Tensor, teacher_h: torch.Tensor | None = None,
               topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Summed per-token ``KL(teacher || student)`` of response hidden states, through the head."""
        m = self.unwrapped
        return chunked_kl(head_function(m), student_h, rows_per_chunk(m), teacher_h=teacher_h, topk=topk)

    def batch_loss(self, batch: Sequence[Trajectory]) -> torch.Tensor:
        """The training loss of a batch: mean per-token KL of the student from the teacher."""
        ids, mask, P = collate(batch, self.pad_id)
        if self.cfg.teacher_topk:  # the teacher's distribution, kept from the sampling pass
            s = self._hidden(self.wrapped, ids, mask, P)
            return self.kl_sum(s, topk=collate_topk(batch)) / s.shape[0]
        # the teacher first: its forward swaps weights that the student's graph will need
        t = self.teacher_hidden(ids, mask, P)
        s = self._hidden(self.wrapped, ids, mask, P)
        return self.kl_sum(s, t) / s.shape[0]

    @torch.no_grad()
    def teacher_logits(self, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
        """The teacher's response-position log-probs, [N, vocab] (whole: for checks, not training)."""
        return F.log_softmax(head_function(self.unwrapped)(self.teacher_hidden(ids, mask, P)).float(), -1)

    # ---- validation ----------------------------------------------------------------------------
    def _shard(self, items: Sequence[Trajectory]) -> list[Trajectory]:
        return list(items[self.acc.process_index::self.acc.num_processes])

    @torch.no_grad()
    def validate(self, val: TrajectorySet, as_source: bool = False) -> float:
        """Mean per-token KL(teacher || student) over the validation responses (all processes);
        ``as_source``: the student side is the source model, unsteered (the unedited model)."""
        # sharded, every forward is a collective: each process runs every batch
        mine = list(val.items) if self.sharded else self._shard(val.items)
        batches = [mine[i:i + self.cfg.batch_size] for i in range(0, len(mine), self.cfg.batch_size)]
        if self._val_teacher is None:  # the teacher never changes: keep its hidden states
            self._val_teacher = [self.teacher_hidden(*collate(b, self.pad_id)) for b in batches]
        total = torch.zeros(2, device=self.acc.device)
        for b, t in zip(batches, self._val_teacher):
            ids, mask, P = collate(b, self.pad_id)
            with self.source_weights() if as_source else nullcontext():
                s = self._hidden(self.unwrapped, ids, mask, P)
            total[0] += self.kl_sum(s, t)
            total[1] += t.shape[0]
        if not self.sharded:
            total = self.acc.reduce(total, reduction="sum")
        return float(total[0] / total[1].clamp(min=1))

    # ---- data order ----------------------------------------------------------------------------
    def batch_for(self, train: TrajectorySet, step: int) -> list[Trajectory]:
        """This process's share of global batch ``step``: a fixed function of (seed, step), so a
        resumed run sees exactly the batches the interrupted one would have."""
        n = len(train.items)
        per_epoch = max(n // self.cfg.batch_size, 1)
        epoch, k = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(self.cfg.seed * 100003 + epoch).shuffle(order)
        glob = order[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]
        return [train.items[i] for i in self._shard(glob)]

    def check_replicas(self) -> bool | None:
        """True when every process holds the same trainable weights (data parallel kept in step)."""
        if self.acc.num_processes == 1:
            return True
        if self.sharded:  # one copy of the weights, split across processes: nothing to compare
            return None
        sums = torch.stack([p.detach().double().sum() for p in self.unwrapped.parameters() if p.requires_grad])
        gathered = self.acc.gather(sums.unsqueeze(0).to(self.acc.device))
        return bool((gathered - gathered[0]).abs().max() <= 1e-9 * gathered[0].abs().max().clamp(min=1))

    # ---- the loop ------------------------------------------------------------------------------
    def train(self, train: TrajectorySet, val: TrajectorySet, *, work_dir: str | os.PathLike | None = None,
              resume: bool = False, on_eval: Callable[["Distiller", dict], None] | None = None,
              on_save: Callable[["Distiller", int], None] | None = None, progress: bool = True,
              stop_after: int | None = None) -> TrainResult:
        """Train until ``max_steps`` or early stopping; restore the best weights at the end.

        ``on_eval(distiller, record)`` runs after each validation (main process); ``on_save(
        distiller, step)`` every ``save_every`` steps, on every process (half-baked exports).
        ``stop_after`` ends the call after that many steps of this call without finishing (used to
        simulate a kill).
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        if len(train) < cfg.min_trajectories:
            raise TrajectoryError(
                f"only {len(train)} training trajectories (at least {cfg.min_trajectories} needed "
                "to learn a behaviour that holds on new prompts): sample more prompts "
                "(--num-prompts, --samples-per-prompt, or --prompts FILE)")
        if len(val) == 0:
            raise TrajectoryError("no validation trajectories: raise --val-prompts above 0")
        if len(train) < cfg.batch_size:
            raise TrajectoryError(f"{len(train)} training trajectories are fewer than one batch "
                                  f"({cfg.batch_size}); lower --batch-size or sample more")
        if cfg.teacher_topk:
            require_topk(train.items)
        if resume and work_dir is not None:
            self.load_checkpoint(work_dir)
        if not self.history:
            if self.warm_start_info is not None and "skipped" not in self.warm_start_info:
                # R's scale: the unedited model is the teacher's weights without the steering
                self._val_teacher = None
                v0 = self.validate(val, as_source=True)
                self.warm_start_info["source_val_kl"] = round(v0, 6)
            v = self.validate(val)
            self.best_val, self.best_step = v, 0
            self.best_state = self.trainable_state()
            rec = {"step": 0, "loss": None, "val_kl": v, "wall_s": 0.0}
            self.history.append(rec)
            if on_eval and self.acc.is_main_process:
                on_eval(self, rec)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"kl-{cfg.method}", unit="step",
                   disable=not (progress and self.acc.is_main_process))
        stopped = False
        t0 = time.perf_counter() - self.elapsed
        run_steps = 0
        loss_ema = None
        while self.step < cfg.max_steps:
            if cfg.patience and self.bad_evals >= cfg.patience:
                stopped = True
                break
            loss = self.batch_loss(self.batch_for(train, self.step))
            self.optimizer.zero_grad(set_to_none=True)
            for g in self.optimizer.param_groups:
                g["lr"] = cfg.lr_at(self.step)
            self.acc.backward(loss)
            if cfg.grad_clip:
                trained = [p for p in self.wrapped.parameters() if p.requires_grad]
                if self.sharded:  # DTensor gradients: the norm is reduced over the shards
                    torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
                else:
                    self.acc.clip_grad_norm_(trained, cfg.grad_clip)
            self.optimizer.step()
            self.step += 1
            run_steps += 1
            lv = float(self.acc.reduce(loss.detach(), reduction="mean"))
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
            self.elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.4f}", val_kl=f"{self.best_val if self.history else float('nan'):.4f}")
            if self.step % cfg.val_every == 0 or self.step == cfg.max_steps:
                v = self.validate(val)
                rec = {"step": self.step, "loss": lv, "val_kl": v, "wall_s": round(self.elapsed, 2)}
                self.history.append(rec)
                if v < self.best_val - cfg.min_delta:
                    self.best_val, self.best_step, self.bad_evals = v, self.step, 0
                    self.best_state = self.trainable_state()
                else:
                    self.bad_evals += 1
                bar.set_postfix(loss=f"{loss_ema:.4f}", val_kl=f"{v:.4f}")
                if on_eval and self.acc.is_main_process:
                    on_eval(self, rec)
            if on_save and cfg.save_every and self.step % cfg.save_every == 0:
                on_save(self, self.step)  # every process: a sharded export gathers first
                self.acc.wait_for_everyone()
            if work_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(work_dir)
            if stop_after is not None and run_steps >= stop_after:
                bar.close()
                return TrainResult(self.step, self.best_step, self.best_val, False, self.history,
                                   self.elapsed)
        bar.close()
        if self.best_state is not None:
            self.load_trainable_state(self.best_state)
        self.replicas_in_sync = self.check_replicas()
        return TrainResult(self.step, self.best_step, self.best_val, stopped, self.history, self.elapsed)
