"""Per-process peak memory of distillation on two processes: FSDP2 (sharded loading, the teacher
as swapped-in source values, streamed export) against plain data parallel (every process holds
the whole model), for kl-lora and kl-full, in one run; and whether the two exports are the same.

Each configuration is a real ``accelerate launch --num_processes 2 -m bakery bake`` (through
``bench/_rss_child.py``, which records every rank's peak RSS, ``VmHWM``, at exit) on the same trajectory
file, sampled once at the start. Run it as ``bench/distill.py memory --processes 2``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = {"data parallel": ["--multi_gpu"], "FSDP2": ["--use_fsdp", "--fsdp_version", "2"]}
# (mode, activation checkpointing): the baseline first
SETUPS = [("data parallel", False), ("FSDP2", False), ("FSDP2", True), ("data parallel", True)]


def _trajectories(args, model_dir: Path, path: Path) -> None:
    """The teacher's trajectories, sampled once in this process (both modes train on them)."""
    from bakery.bakers.distill.pipeline import teacher_meta
    from bakery.bakers.distill.prompts import prompt_pool
    from bakery.bakers.distill.trajectories import sample
    from bakery.models import load_model, load_tokenizer, read_config
    from bakery.steering.hooks import steer
    from bakery.vectors.load import load_vector

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    vec = load_vector(args.vector)
    ctx = lambda P: steer(model, vec, args.layer, args.coef, positions="response", prompt_len=P)
    ts = sample(model, tok, prompt_pool(args.num_prompts, seed=3), ctx, max_new_tokens=args.max_new_tokens,
                batch_size=16, seed=0, progress=False,
                meta=teacher_meta(read_config(model_dir), vec, args.layer, args.coef, "response"))
    ts.save(path)


def _launch(args, mode: str, ac: bool, method: str, traj: Path, out: Path, rss_dir: Path) -> dict:
    acc = Path(sys.executable).with_name("accelerate")
    cmd = [str(acc), "launch", *MODES[mode], "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(HERE / "_rss_child.py"),
           "bake", "--method", method, "-v", args.vector, "-l", str(args.layer), "-c", str(args.coef),
           "--steps", str(args.steps), "-o", str(out), "--force",
           *(["--model", args.model] if args.model else []),
           *[a for k, v in {"trajectories": traj, "val_prompts": 4, "val_every": args.steps, "checkpoint_every": 0,
                            "patience": 0, "batch_size": args.batch_size, "dtype": "float32",
                            "activation_checkpointing": str(ac).lower()}.items()
             for a in ("--set", f"{k}={v}")]]
    # a fixed mmap threshold: glibc then returns freed large blocks to the system, so the peak is
    # what was live at once, not what its arenas kept (both setups alike; see docs/distillation.md)
    env = {**os.environ, "BAKERY_BENCH_RSS_DIR": str(rss_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE.parent), "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{mode} {method} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    peaks = [json.loads(p.read_text())["peak_rss_mb"] for p in sorted(rss_dir.glob("rank*.json"))]
    if len(peaks) != 2:
        raise SystemExit(f"{mode} {method}: expected two ranks' peaks in {rss_dir}, found {len(peaks)}")
    return {"peaks_mb": peaks, "wall_s": round(wall, 1)}


def _import_baseline(args) -> float:
    """Peak RSS (MB) of a process that only imports what a bake imports (torch, transformers, peft,
    accelerate, bakery's distillation) and the tokenizer: the part no sharding can shrink."""
    code = ("import torch, transformers, peft, accelerate\n"
            "import bakery.bakers.distill.pipeline, bakery.cli\n"
            "from bakery.models import load_tokenizer, resolve_model\n"
            "from bake import _peak_mb\n"
            f"load_tokenizer(resolve_model({args.model!r}))\n"
            "print(_peak_mb())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold),
           "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _export_diff(a: Path, b: Path) -> tuple[float, int, bool]:
    """(max |difference| over every weight, tensors compared, same names) of two exports."""
    from bakery.io.checkpoint import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    same = set(ra.keys()) == set(rb.keys())
    worst = 0.0
    for k in ra.keys():
        if k in rb:
            worst = max(worst, float((ra.get(k).float() - rb.get(k).float()).abs().max()))
    return worst, len(ra.keys()), same


def run(args) -> None:
    from bakery.models import resolve_model

    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="bakery-shard-bench-") as td:
        td = Path(td)
        traj = td / "trajectories.jsonl"
        _trajectories(args, model_dir, traj)
        print(f"{model_dir.name}: {args.steps} steps of batch {args.batch_size} on 2 CPU processes (gloo), "
              f"{args.num_prompts} trajectories of {args.max_new_tokens} tokens, layer {args.layer}, coef {args.coef:g}",
              flush=True)
        floor = _import_baseline(args)
        print(f"a process that only imports torch, transformers, peft, accelerate and bakery and loads the "
              f"tokenizer peaks at {floor:.0f} MB", flush=True)
        print(f"{'method':8s} {'setup':42s} {'peak RSS rank 0 / rank 1 (MB)':>30s} {'wall (s)':>9s}")
        results = {}
        for method in args.methods:
            for mode, ac in SETUPS:
                name = f"{mode}{', activation checkpointing' if ac else ''}"
                tag = f"{method}-{mode[:4]}-{int(ac)}"
                (td / f"rss-{tag}").mkdir()
                r = _launch(args, mode, ac, method, traj, td / tag, td / f"rss-{tag}")
                results[(method, name)] = r
                print(f"{method:8s} {name:42s} {r['peaks_mb'][0]:14.0f} / {r['peaks_mb'][1]:<13.0f} "
                      f"{r['wall_s']:9.1f}", flush=True)
            base = max(results[(method, "data parallel")]["peaks_mb"])
            for mode, ac in SETUPS[1:]:
                name = f"{mode}{', activation checkpointing' if ac else ''}"
                worst, n, same = _export_diff(td / f"{method}-data-0", td / f"{method}-{mode[:4]}-{int(ac)}")
                peak = max(results[(method, name)]["peaks_mb"])
                print(f"{method}: {name} / data parallel, largest process: peak memory x{peak / base:.2f} "
                      f"(above the import baseline: x{(peak - floor) / (base - floor):.2f}); export against data "
                      f"parallel's: {n} tensors, {'the same names' if same else 'DIFFERENT names'}, max |difference| "
                      f"{worst:.2e}", flush=True)
            fa = max(results[(method, "FSDP2, activation checkpointing")]["peaks_mb"])
            da = max(results[(method, "data parallel, activation checkpointing")]["peaks_mb"])
            print(f"{method}: with activation checkpointing on both sides, FSDP2 / data parallel x{fa / da:.2f}",
                  flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "sharded_memory.json").write_text(json.dumps(
                {f"{m} / {name}": r for (m, name), r in results.items()}, indent=1))


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--vector", default=str(HERE.parent / "exports/demo/vectors/pirate.safetensors"))
    p.add_argument("--layer", type=int, default=17)
    p.add_argument("--coef", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=["kl-lora", "kl-full"])
    p.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                   help="MALLOC_MMAP_THRESHOLD_ for every launched process (bytes)")
    p.add_argument("--out", default=None)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
