"""Benchmarks of the distilled bakers on the embedded model (or any --model).

``fidelity``: bake kl-lora and/or kl-full from the same trajectories and print recovered effect R
on held-out questions (a trait recipe's evaluation questions, never trained on) against training
steps and wall time; writes JSON, a PNG plot and the exports.

``memory``: peak memory and training tokens/s of the one-copy LoRA teacher (adapter switched off)
against a two-copy teacher/student setup, each measured in a fresh subprocess of this run.

    .venv/bin/python bench/distill.py fidelity --out /tmp/distill-bench
    .venv/bin/python bench/distill.py memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bakery.bakers.distill import DistillRequest, bake_distilled
from bakery.distill_train import Distiller, TrainConfig, response_logprobs
from bakery.fidelity import measure, model_scorer
from bakery.models import load_model, load_tokenizer, resolve_model
from bakery.steering import steer
from bakery.trajectories import TrajectorySet, collate, prompt_pool, sample, to_fidelity
from bakery.vectors import describe_layer, load_vector


class Cached:
    """A scorer whose results are kept (the reference and the base never change)."""

    def __init__(self, scorer):
        self.scorer, self.memo = scorer, {}

    def __call__(self, ids, mask, P):
        k = (ids.data_ptr(), P)
        if k not in self.memo:
            self.memo[k] = self.scorer(ids, mask, P)
        return self.memo[k]


def held_out_questions(recipe: str | None) -> list[str]:
    if recipe:
        from bakery.recipes import load_trait_recipe

        return load_trait_recipe(recipe).eval_questions
    return ["How do I bake bread?", "What is the tallest mountain in the world?", "How can I sleep better?",
            "Tell me about your hometown.", "How does a car engine work?", "Can you recommend a good film?",
            "How do I clean my kitchen?", "Why do people keep pets?", "How do I make a cup of tea?",
            "What makes a good friend?", "How should I plan a holiday?", "Explain how plants grow."]


def fidelity(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    ref_model = load_model(model_dir)
    vec = load_vector(args.vector)
    held = held_out_questions(args.recipe)
    ctx = lambda P: steer(ref_model, vec, args.layer, args.coef, positions=args.positions, prompt_len=P)
    test_path = out / "test_trajectories.jsonl"
    if test_path.is_file():
        test = TrajectorySet.load(test_path)
    else:
        test = sample(ref_model, tok, held, ctx, samples_per_prompt=args.test_samples,
                      max_new_tokens=args.max_new_tokens, batch_size=10, seed=12345)
        test.save(test_path)
    traj = to_fidelity(test, tok.pad_token_id, batch_size=10)
    ref = Cached(model_scorer(ref_model, ctx))
    base = Cached(model_scorer(ref_model))
    print(f"held-out: {len(held)} questions x {args.test_samples}, {traj.num_response_tokens} response tokens; "
          f"{describe_layer(args.layer)}, coef {args.coef:g}, positions {args.positions}", flush=True)
    results = {}
    for method in args.methods:
        curve = []
        eval_s = [0.0]

        def on_eval(d: Distiller, rec: dict) -> None:
            train_wall = rec["wall_s"] - eval_s[0]  # wall_s counts earlier held-out evaluations
            t0 = time.perf_counter()
            f = measure(traj, ref, base, {"bake": model_scorer(d.unwrapped)})["bake"]
            if rec["step"] > 0:
                eval_s[0] += time.perf_counter() - t0
            row = {**rec, "R": round(f.recovered, 4), "kl": round(f.kl, 5), "kl_base": round(f.kl_base, 5),
                   "top1": round(f.top1, 4), "top1_base": round(f.top1_base, 4),
                   "train_wall_s": round(train_wall, 1)}
            curve.append(row)
            print(f"[{method}] step {row['step']:4d}  val KL {row['val_kl']:.4f}  held-out R {row['R']:.4f}  "
                  f"top1 {row['top1']:.3f}  train wall {row['train_wall_s']:.0f} s", flush=True)

        tc = TrainConfig(rank=args.rank, max_steps=args.steps, val_every=args.val_every, patience=args.patience,
                         batch_size=args.batch_size, checkpoint_every=0,
                         lr=args.lr_lora if method == "kl-lora" else args.lr_full)
        req = DistillRequest(model=str(model_dir), vector=args.vector, layer=args.layer, coef=args.coef,
                             out=out / method, method=method, positions=args.positions, recipe=args.recipe,
                             held_out=held, num_prompts=args.num_prompts,
                             samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                             trajectories=str(out / "train_trajectories.jsonl"), work_dir=str(out / f"{method}.work"),
                             dtype=args.dtype, force=True, train=tc, command="bench/distill.py fidelity")
        t0 = time.perf_counter()
        res = bake_distilled(req, on_eval=on_eval, progress=not args.no_progress)
        total = time.perf_counter() - t0
        best = max(curve, key=lambda r: r["R"])
        final = next(r for r in curve if r["step"] == res.result.best_step)
        results[method] = {"curve": curve, "best_step": res.result.best_step, "R_at_best_val": final["R"],
                           "best_R_seen": best["R"], "stopped_early": res.result.stopped_early,
                           "total_s": round(total, 1), "export": str(res.out), "info": {
                               k: v for k, v in res.info.items() if k != "history"}}
        print(f"[{method}] exported {res.out}: R {final['R']:.4f} at step {res.result.best_step} "
              f"(chosen by validation KL), {total:.0f} s in all", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    ts = TrajectorySet.load(out / "train_trajectories.jsonl")
    results["trajectories"] = {"count": len(ts), "tokens": ts.num_response_tokens,
                               "sample_seconds": ts.meta.get("sample_seconds")}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "r_vs_steps.png")
    print(f"wrote {out / 'results.json'} and {out / 'r_vs_steps.png'}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, r in results.items():
        if "curve" not in r:
            continue
        c = r["curve"]
        axes[0].plot([x["step"] for x in c], [x["R"] for x in c], marker="o", label=method)
        axes[1].plot([x["train_wall_s"] for x in c], [x["R"] for x in c], marker="o", label=method)
    for ax, xl in zip(axes, ("training step", "training wall time (s, 2 shared CPU cores)")):
        ax.axhline(0.95, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("recovered effect R (held-out)")
        ax.set_ylim(0, 1.02)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- memory: one-copy LoRA teacher vs two copies ---------------------------------------------------
def memory_child(args) -> None:
    """One setup in a fresh process: train ``steps`` LoRA steps, report peak RSS and tokens/s."""
    import copy

    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    vec = load_vector(args.vector)
    prompts = prompt_pool(args.batch_size * (args.steps + 1), seed=1)
    ctx_base = lambda m: (lambda P: steer(m, vec, args.layer, args.coef, positions="response", prompt_len=P))
    ts = sample(model, tok, prompts[:args.batch_size * 2], ctx_base(model), max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size, progress=False)
    rss0 = _rss_mb()
    teacher = copy.deepcopy(model).eval() if args.setup == "two-copy" else None
    cfg = TrainConfig(rank=args.rank, batch_size=args.batch_size, max_steps=10**6, min_trajectories=1)
    d = Distiller(model, tok.pad_token_id, cfg, ctx_base)
    if teacher is not None:  # the two-copy baseline: a frozen steered teacher beside the student
        d.teacher, d.teacher_ctx = teacher, ctx_base(teacher)
    batches = [ts.items[i:i + args.batch_size] for i in range(0, len(ts.items), args.batch_size)]
    tokens, t0 = 0, None
    for step in range(args.steps + 1):
        if step == 1:
            t0 = time.perf_counter()  # step 0 is warm-up
        ids, mask, P = collate(batches[step % len(batches)], tok.pad_token_id)
        t = d.teacher_logits(ids, mask, P)
        s = d.student_logprobs(ids, mask, P)
        loss = (t.exp() * (t - s)).sum(-1).mean()
        d.optimizer.zero_grad()
        loss.backward()
        d.optimizer.step()
        if step >= 1:
            tokens += int(mask.sum())
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"setup": args.setup, "peak_rss_mb": round(peak, 1), "rss_after_load_mb": round(rss0, 1),
                      "tokens_per_s": round(tokens / dt, 1), "s_per_step": round(dt / args.steps, 2),
                      "steps": args.steps, "batch_size": args.batch_size}))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(args) -> None:
    rows = []
    for setup in ("one-copy", "two-copy"):
        cmd = [sys.executable, __file__, "_memory_child", "--setup", setup, "--model", str(args.model),
               "--vector", args.vector, "--layer", str(args.layer), "--coef", str(args.coef),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--rank", str(args.rank),
               "--max-new-tokens", str(args.max_new_tokens)]
        outp = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(outp.strip().splitlines()[-1]))
    a, b = rows
    print(f"{'setup':10s} {'peak RSS MB':>12s} {'tokens/s':>9s} {'s/step':>7s}")
    for r in rows:
        print(f"{r['setup']:10s} {r['peak_rss_mb']:12.0f} {r['tokens_per_s']:9.1f} {r['s_per_step']:7.2f}")
    print(f"one-copy / two-copy: peak memory x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}, "
          f"tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f} "
          f"({args.steps} LoRA steps of batch {args.batch_size}, rank {args.rank}, same run)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fidelity", "memory", "_memory_child"])
    p.add_argument("--model", default=None)
    p.add_argument("--vector", default="/tmp/pirate_quick.safetensors")
    p.add_argument("--layer", type=int, default=16)
    p.add_argument("--coef", type=float, default=2.0)
    p.add_argument("--recipe", default="pirate")
    p.add_argument("--positions", default="response", choices=["response", "all"])
    p.add_argument("--methods", nargs="+", default=["kl-lora", "kl-full"])
    p.add_argument("--out", default="/tmp/distill-bench")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr-lora", type=float, default=2e-4)
    p.add_argument("--lr-full", type=float, default=2e-5)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--test-samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--setup", default="one-copy")
    args = p.parse_args()
    {"fidelity": fidelity, "memory": memory, "_memory_child": memory_child}[args.what](args)


if __name__ == "__main__":
    main()
