"""What a distilled bake reports: the training run's figures for the manifest and the card
(steps, validation KL and R, the data, the processes, what trained) and the warm start's note."""

from __future__ import annotations

from typing import Any


def _warm_start_note(ws: dict, history: list[dict], base_kl: float, val_r: float | None, best_step: int) -> str:
    off = "" if ws["unsteered_mean"] is None else f", {ws['unsteered_mean']:.3f} at unsteered ones"
    where = (f"the down-projections of {ws['experts_fitted']} of block {ws['block']}'s {ws['experts']} experts "
             "(one u per expert, fitted on the tokens routed to it)" if "experts" in ws
             else f"block {ws['block']}'s MLP")
    held = " (LoRA components)" if "lora_components" in ws else ""
    gate = (f"one repurposed MLP neuron (neuron {ws['neuron']}) reading the MLP input with the other neurons"
            if ws.get("gate") == "neuron" else "u . a")
    return (f"warm start: coef * v written through {where}{held}, gated by {gate} (mean "
            f"{ws['steered_mean']:.3f} at steered tokens{off}; {ws['tokens']} tokens); validation R "
            f"{1 - history[0]['val_kl'] / base_kl:.4f} before training, {val_r:.4f} at step {best_step}")


def run_info(run, d, train, val, ts, extra: dict | None = None) -> dict[str, Any]:
    """The figures of ``d`` (a :class:`~bakery.bakers.distill.train.Distiller`) trained in ``run``
    (a :class:`~bakery.bakers.distill.pipeline.Run`) on ``train``/``val`` drawn from ``ts``."""
    tc, ws = run.train, d.warm_start_info or {}
    # R's scale is the unedited model's KL (a warm-started student's step 0 is already close)
    base_kl = ws.get("source_val_kl") or (d.history[0]["val_kl"] if d.history else float("nan"))
    i: dict[str, Any] = {
        "steps": d.step, "best_step": d.best_step, "best_val_kl": round(d.best_val, 6),
        "val_kl_base": round(base_kl, 6), "val_R": round(1 - d.best_val / base_kl, 4) if base_kl else None,
        "lr": tc.resolved_lr(), "lr_schedule": tc.lr_schedule, "teacher_topk": tc.teacher_topk,
        "batch_size": tc.batch_size, "train_trajectories": len(train), "train_tokens": train.num_response_tokens,
        "val_trajectories": len(val), "wall_s": round(d.elapsed, 1), "positions": run.settings.positions,
        "history": d.history, "processes": run.acc.num_processes,
        "distributed_type": str(run.acc.distributed_type).split(".")[-1], "sharding": d.sharding,
        "activation_checkpointing": tc.checkpoints_activations(run.sharded),
        "replicas_in_sync": d.replicas_in_sync, "sample_seconds": ts.meta.get("sample_seconds"),
        "teacher_engine": ts.meta.get("teacher_engine", "transformers"),
        "vector_norm": round(float(run.row.norm()), 4)}
    i.update(d.targets, experts=tc.experts)
    if tc.method == "lora":
        i.update(rank=tc.rank, alpha=tc.resolved_alpha(), rslora=tc.rslora)
        if tc.first_block:
            i.update(first_block=tc.first_block)
        if d.warm_start_info is not None:
            i.update(warm_start=d.warm_start_info)
    else:
        i.update(first_block=tc.first_block, warm_start=d.warm_start_info,
                 trained_parameters=sum(p.numel() for p in d.unwrapped.parameters() if p.requires_grad))
    if "block" in ws and d.history:
        i["notes"] = [_warm_start_note(ws, d.history, base_kl, i["val_R"], d.best_step)]
    elif "skipped" in ws:
        i["notes"] = [f"no warm start: {ws['skipped']}"]
    return {**i, **(extra or {})}
