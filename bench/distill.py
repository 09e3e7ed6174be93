"""Benchmarks of the distilled bakers on the embedded model (or any --model).

``fidelity``: bake kl-lora and/or kl-full from the same trajectories and print recovered effect R
on held-out questions (a trait recipe's evaluation questions, never trained on) against training
steps and wall time; writes JSON, a PNG plot and the exports.

``teacher``: trajectories per second of hooked transformers generation against vLLM sampling the
exact bias bake (``--teacher-engine vllm``, positions=all), with a check that both sample the same
steered distribution.

``memory``: peak memory and training tokens/s of the one-copy LoRA teacher (adapter switched off)
against a two-copy teacher/student setup, each measured in a fresh subprocess of this run.

    .venv/bin/python bench/distill.py fidelity --out /tmp/distill-bench
    .venv/bin/python bench/distill.py memory
    .venv/bin/python bench/distill.py teacher --num-prompts 64 --max-new-tokens 48
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

from bakery.bakers.api import prepare
from bakery.bakers.distilled import bake_distilled
from bakery.bakers.distill.train import Distiller
from bakery.bakers.distill.train_config import TrainConfig
from bakery.fidelity.metrics import measure, model_scorer
from bakery.models import load_model, load_tokenizer, resolve_model
from bakery.steering.hooks import steer
from bakery.bakers.distill.prompts import prompt_pool
from bakery.bakers.distill.trajectories import TrajectorySet, collate, sample, to_fidelity
from bakery.naming import describe_layer
from bakery.vectors.load import load_vector


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
        from bakery.traits import load_trait_recipe

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
                      max_new_tokens=args.max_new_tokens, batch_size=20, seed=12345)
        test.save(test_path)
    traj = to_fidelity(test, tok.pad_token_id, batch_size=10)
    ref = Cached(model_scorer(ref_model, ctx))
    base = Cached(model_scorer(ref_model))
    print(f"held-out: {len(held)} questions x {args.test_samples}, {traj.num_response_tokens} response tokens; "
          f"{describe_layer(args.layer)}, coef {args.coef:g}, positions {args.positions}", flush=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    for method in args.methods:
        prev = results.get(method, {}) if args.resume else {}
        curve = list(prev.get("curve", []))
        # held-out evaluations so far (older results lack eval_s: wall_s - train_wall_s of the last row,
        # which misses only that last evaluation's few seconds)
        eval_s = [prev.get("eval_s", curve[-1]["wall_s"] - curve[-1]["train_wall_s"] if curve else 0.0)]

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

        lora = method == "kl-lora"
        options = dict(steps=args.steps if lora else args.steps_full or args.steps, val_every=args.val_every,
                       patience=args.patience, batch_size=args.batch_size, checkpoint_every=args.val_every,
                       lr=args.lr_lora if lora else args.lr_full,
                       lr_schedule=args.schedule_lora if lora else args.schedule_full,
                       teacher_topk=args.teacher_topk,
                       first_block=args.first_block_lora if lora else args.first_block_full,
                       warm_start=False if args.no_warm_start else None, warm_start_gate=args.gate,
                       target_modules=args.targets_full.split(",") if not lora and args.targets_full else None,
                       positions=args.positions, recipe=args.recipe, held_out=held, num_prompts=args.num_prompts,
                       val_prompts=args.val_prompts, sample_batch_size=args.sample_batch_size,
                       samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                       trajectories=str(out / "train_trajectories.jsonl"), work_dir=str(out / f"{method}.work"),
                       dtype=args.dtype, resume=args.resume, **({"rank": args.rank} if lora else {}))
        req = prepare(method, str(model_dir), [(args.vector, args.layer, args.coef)], out / method, force=True,
                      **options)
        req.command = "bench/distill.py fidelity"
        t0 = time.perf_counter()
        res = bake_distilled(req, force=True, on_eval=on_eval, progress=not args.no_progress)
        total = time.perf_counter() - t0
        best = max(curve, key=lambda r: r["R"])
        final = next(r for r in curve if r["step"] == res.result.best_step)
        results[method] = {"curve": curve, "best_step": res.result.best_step, "R_at_best_val": final["R"],
                           "best_R_seen": best["R"], "stopped_early": res.result.stopped_early,
                           "total_s": round(total, 1), "eval_s": eval_s[0], "export": str(res.out), "info": {
                               k: v for k, v in res.info.items() if k != "history"}}
        info = res.info
        results[method]["settings"] = {"lr": info["lr"], "schedule": info["lr_schedule"], "rank": info.get("rank"),
                                       "max_steps": options["steps"], "patience": args.patience,
                                       "max_new_tokens": args.max_new_tokens,
                                       "warm_start": res.info.get("warm_start")}
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
        axes[0].plot([x["step"] for x in c], [x["R"] for x in c], marker="o", ms=3, label=method)
        axes[1].plot([x["train_wall_s"] for x in c], [x["R"] for x in c], marker="o", ms=3, label=method)
    for ax, xl in zip(axes, ("training step (batch 8)", "training wall time (s, 2 CPU cores)")):
        ax.axhline(0.95, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("recovered effect R (held-out)")
        ax.set_ylim(0.5, 1.0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_only(args) -> None:
    """Merge ``results.json`` files (later files win per method; ``FILE:LABEL`` names a run's
    curves ``method (LABEL)``) and draw one plot."""
    merged: dict = {}
    for f in args.results:
        f, _, label = f.partition(":")
        merged.update({(f"{k} ({label})" if label else k): v
                       for k, v in json.loads(Path(f).read_text()).items() if "curve" in v})
    path = Path(args.out) / "r_vs_steps.png"
    plot(merged, path)
    for method, r in merged.items():
        print(method + ": " + ", ".join(f"step {x['step']} R {x['R']:.3f} ({x['train_wall_s']:.0f} s)" for x in r["curve"]))
    print(f"wrote {path}")


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
    topk = 32 if args.setup == "one-copy-topk" else 0
    ts = sample(model, tok, prompts[:args.batch_size * 2], ctx_base(model), max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size, progress=False, keep_topk=topk)
    rss0 = _rss_mb()
    teacher = copy.deepcopy(model).eval() if args.setup == "two-copy" else None
    cfg = TrainConfig(rank=args.rank, batch_size=args.batch_size, max_steps=10**6, min_trajectories=1, teacher_topk=topk)
    d = Distiller(model, tok.pad_token_id, cfg, ctx_base)
    if teacher is not None:  # the two-copy baseline: a frozen steered teacher beside the student
        d.teacher, d.teacher_ctx = teacher, ctx_base(teacher)
    batches = [ts.items[i:i + args.batch_size] for i in range(0, len(ts.items), args.batch_size)]
    tokens, t0 = 0, None
    for step in range(args.steps + 1):
        if step == 1:
            t0 = time.perf_counter()  # step 0 is warm-up
        batch = batches[step % len(batches)]
        ids, mask, P = collate(batch, tok.pad_token_id)
        loss = d.batch_loss(batch)  # the teacher's top-k kept from sampling, if any: no teacher forward
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
    if args.processes > 1:  # FSDP2 against data parallel, per process: bench/sharded_memory.py
        import sharded_memory

        if args.processes != 2:
            raise SystemExit("memory --processes: the two-process comparison only (2)")
        return sharded_memory.main(["--vector", args.vector, "--layer", str(args.layer), "--coef", str(args.coef),
                                    *(["--model", str(args.model)] if args.model else []),
                                    *(["--out", args.out] if args.out != "/tmp/distill-bench" else [])])
    rows = []
    for setup in ("one-copy", "two-copy", "one-copy-topk"):
        cmd = [sys.executable, __file__, "_memory_child", "--setup", setup,
               *(["--model", str(args.model)] if args.model else []), "--vector", args.vector, "--layer", str(args.layer), "--coef", str(args.coef),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--rank", str(args.rank),
               "--max-new-tokens", str(args.max_new_tokens)]
        outp = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(outp.strip().splitlines()[-1]))
    a, b, c = rows
    print(f"{'setup':14s} {'peak RSS MB':>12s} {'tokens/s':>9s} {'s/step':>7s}")
    for r in rows:
        print(f"{r['setup']:14s} {r['peak_rss_mb']:12.0f} {r['tokens_per_s']:9.1f} {r['s_per_step']:7.2f}")
    print(f"one-copy / two-copy: peak memory x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}, "
          f"tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f} "
          f"({args.steps} LoRA steps of batch {args.batch_size}, rank {args.rank}, same run)")
    print(f"kept top-32 teacher / teacher forward (one copy each): tokens/s x{c['tokens_per_s'] / a['tokens_per_s']:.2f}, "
          f"peak memory x{c['peak_rss_mb'] / a['peak_rss_mb']:.2f}")


# ---- reload the exports from disk: R with plain transformers, merged vs base + adapter -------------------
def reload(args) -> None:
    """Load each export folder as a plain checkpoint (no bakery code in the forward) and measure R on
    the held-out trajectories; for kl-lora also compare the merged weights with base + adapter/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bakery.io.manifest import Manifest

    out = Path(args.out)
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    ref_model = load_model(model_dir)
    test = TrajectorySet.load(out / "test_trajectories.jsonl")
    traj = to_fidelity(test, tok.pad_token_id, batch_size=10)
    for folder in args.exports or [str(out / m) for m in ("kl-lora", "kl-full")]:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        m = Manifest.load(folder)
        t = m.terms[0]
        vec = load_vector(folder / t.vector_file)
        ctx = lambda P: steer(ref_model, vec, t.layer, t.coef, positions=m.positions, prompt_len=P)
        baked = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        f = measure(traj, model_scorer(ref_model, ctx), model_scorer(ref_model), {"bake": model_scorer(baked)})["bake"]
        line = (f"{folder.name}: reloaded with AutoModelForCausalLM ({m.method}, stored "
                f"{json.loads((folder / 'config.json').read_text()).get('dtype')}): held-out R {f.recovered:.4f}, "
                f"KL {f.kl:.4f} (base {f.kl_base:.4f}), top-1 {f.top1:.3f} (base {f.top1_base:.3f}), {f.tokens} tokens")
        print(line)
        if (folder / "adapter").is_dir():
            peft = PeftModel.from_pretrained(load_model(model_dir), folder / "adapter").eval()
            worst = 0.0
            with torch.no_grad():
                for ids, mask, P in traj.batches:
                    a = baked(input_ids=ids, attention_mask=mask).logits
                    b = peft(input_ids=ids, attention_mask=mask).logits
                    keep = mask.bool()
                    worst = max(worst, float((a - b)[keep].abs().max()))
            print(f"  merged export vs base + adapter/ (PeftModel): max |logit difference| {worst:.2e} "
                  f"over {int(sum(m_.sum() for _, m_, _ in traj.batches))} positions")
        del baked


# ---- vLLM serving adapter/ as a LoRA -------------------------------------------------------------------
VLLM_LORA_SCRIPT = r"""
import json, os, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
if __name__ == "__main__":
    spec = json.load(open(sys.argv[1]))
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    t0 = time.time()
    llm = LLM(model=spec["base"], dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              enable_lora=True, max_lora_rank=spec["rank"], max_loras=1, enable_prefix_caching=False)
    load_s = time.time() - t0
    lora = LoRARequest("bake", 1, spec["adapter"])
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    out = {"vllm_version": vllm.__version__, "load_seconds": round(load_s, 1)}
    g = SamplingParams(max_tokens=40, temperature=0.0)
    for name, req in (("lora", lora), ("base", None)):
        gens = llm.generate([{"prompt_token_ids": ids} for ids in spec["gen_prompts"]], g, lora_request=req,
                            use_tqdm=False)
        out["greedy_" + name] = [o.outputs[0].text for o in gens]
    json.dump(out, open(sys.argv[2], "w"))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for name, req in (("lora", lora), ("base", None)):
        res = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, lora_request=req,
                           use_tqdm=False)
        out[name] = [[None if e is None else float(e[ids[t]].logprob) for t, e in enumerate(r.prompt_logprobs)]
                     for ids, r in zip(spec["prompts"], res)]
    json.dump(out, open(sys.argv[2], "w"))
"""


def teacher(args) -> None:
    """--teacher-engine: trajectories from hooked transformers generation against vLLM sampling the
    exact bias bake (positions=all), same prompts and settings, in one run. Both sets are then scored
    under runtime steering and the unsteered model: the same steered distribution gives the same
    mean log-probability."""
    import tempfile

    from bakery.bakers.api import prepare
    from bakery.bakers.distill.pipeline import prepare as prepare_run, sample_from_bias_bake
    from bakery.bakers.distilled import teacher_bias_bake
    from bakery.bakers.distill.trajectories import mean_logprob

    model_dir = resolve_model(args.model)
    m, tok = load_model(model_dir), load_tokenizer(model_dir)
    vec = load_vector(args.vector)
    pool = prompt_pool(args.num_prompts, exclude=held_out_questions(args.recipe))
    steered = lambda P: steer(m, vec, args.layer, args.coef, positions="all", prompt_len=P)
    print(f"{len(pool)} prompts x {args.samples_per_prompt} samples, {args.max_new_tokens} new tokens, "
          f"{describe_layer(args.layer)}, coef {args.coef:g}, positions all, {torch.get_num_threads()} threads",
          flush=True)
    t0 = time.perf_counter()
    tf = sample(m, tok, pool, steered, samples_per_prompt=args.samples_per_prompt,
                max_new_tokens=args.max_new_tokens, batch_size=args.sample_batch_size, seed=0,
                progress=not args.no_progress)
    tf_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bakery-teacher-") as work:
        job = prepare("kl-lora", str(model_dir), [(vec, args.layer, args.coef, "bench")], Path(work) / "unused",
                      positions="all", samples_per_prompt=args.samples_per_prompt,
                      max_new_tokens=args.max_new_tokens, teacher_engine="vllm", work_dir=work)
        run = prepare_run(job)
        t0 = time.perf_counter()
        vl = sample_from_bias_bake(run, teacher_bias_bake(job.model_dir), pool)
        vl_s = time.perf_counter() - t0
    rows = {}
    for name, ts, wall in (("transformers (hooked)", tf, tf_s), ("vLLM (bias bake)", vl, vl_s)):
        rows[name] = {"trajectories": len(ts), "tokens": ts.num_response_tokens, "wall_s": round(wall, 1),
                      "tokens_per_s": round(ts.num_response_tokens / wall, 1),
                      "logprob_steered": round(mean_logprob(ts, model_scorer(m, steered), tok.pad_token_id), 4),
                      "logprob_unsteered": round(mean_logprob(ts, model_scorer(m), tok.pad_token_id), 4)}
    v = rows["vLLM (bias bake)"]
    v.update(vllm_load_s=vl.meta["vllm_load_seconds"], vllm_sample_s=vl.meta["vllm_sample_seconds"],
             sample_tokens_per_s=round(v["tokens"] / vl.meta["vllm_sample_seconds"], 1))
    for name, r in rows.items():
        print(f"{name:22s} {r['trajectories']:5d} trajectories {r['tokens']:6d} tokens in {r['wall_s']:7.1f} s "
              f"= {r['tokens_per_s']:7.1f} tok/s; mean log-prob steered {r['logprob_steered']:.3f}, "
              f"unsteered {r['logprob_unsteered']:.3f}")
    t = rows["transformers (hooked)"]
    print(f"vLLM: {v['vllm_load_s']} s to load, {v['vllm_sample_s']} s to sample "
          f"({v['sample_tokens_per_s']} tok/s)")
    print(f"speed-up, whole call (bias bake + vLLM start included): {v['tokens_per_s'] / t['tokens_per_s']:.2f}x; "
          f"sampling alone: {v['sample_tokens_per_s'] / t['tokens_per_s']:.2f}x")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "teacher.json").write_text(json.dumps(rows, indent=1))


def _hf_greedy(model, tok, prompts: list[list[int]], n: int = 40) -> list[str]:
    outs = []
    with torch.no_grad():
        for ids in prompts:
            g = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False)
            outs.append(tok.decode(g[0, len(ids):], skip_special_tokens=True))
    return outs


def vllm_lora(args) -> None:
    """Serve ``EXPORT/adapter`` as a LoRA in the vLLM CPU build and compare teacher-forced log-probs
    of the actual tokens with transformers + peft on the held-out trajectories."""
    import tempfile

    from peft import PeftModel

    export = Path(args.export)
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    test = TrajectorySet.load(Path(args.out) / "test_trajectories.jsonl").items[:args.n]
    seqs = [t.prompt_ids + t.response_ids for t in test]
    peft = PeftModel.from_pretrained(load_model(model_dir), export / "adapter").eval()
    hf = []
    with torch.no_grad():
        for t, ids in zip(test, seqs):
            lp = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            P = len(t.prompt_ids)
            hf.append([float(lp[i - 1, ids[i]]) for i in range(P, len(ids))])
    rank = json.loads((export / "adapter" / "adapter_config.json").read_text())["r"]
    with tempfile.TemporaryDirectory() as td:
        spec = {"base": str(model_dir), "adapter": str((export / "adapter").resolve()), "rank": rank,
                "prompts": seqs, "gen_prompts": [t.prompt_ids for t in test[:3]]}
        (Path(td) / "spec.json").write_text(json.dumps(spec))
        (Path(td) / "run.py").write_text(VLLM_LORA_SCRIPT)
        py = Path(args.vllm_python)
        t0 = time.perf_counter()
        r = subprocess.run([str(py), str(Path(td) / "run.py"), str(Path(td) / "spec.json"), str(Path(td) / "out.json")],
                           capture_output=True, text=True)
        res = json.loads((Path(td) / "out.json").read_text()) if (Path(td) / "out.json").is_file() else None
        if res is not None:  # greedy generation with and without the LoRA worked
            print(f"vLLM {res['vllm_version']} loaded the base with enable_lora=True and adapter/ (rank {rank}) "
                  f"in {res['load_seconds']} s; greedy answers, LoRA vs no LoRA:")
            hf_greedy = _hf_greedy(peft, tok, [t.prompt_ids for t in test[:3]])
            for t, a, b, h in zip(test, res["greedy_lora"], res["greedy_base"], hf_greedy):
                print(f"  > {t.prompt}\n    vLLM+LoRA:         {a.strip()[:150]}\n    transformers+peft: "
                      f"{h.strip()[:150]}\n    vLLM, no LoRA:     {b.strip()[:150]}")
        if r.returncode != 0:
            log = Path(args.out) / "vllm_lora_stderr.txt"
            log.write_text(r.stdout + "\n" + r.stderr)
            errs = [ln for ln in (r.stdout + r.stderr).splitlines() if "Error" in ln or "error:" in ln]
            print(f"vLLM could not serve the adapter (exit {r.returncode}); full log in {log}; errors:\n  "
                  + "\n  ".join(errs[:8]))
            return
        res = json.loads((Path(td) / "out.json").read_text())
    gaps, gaps_base = [], []
    for t, h, v, b in zip(test, hf, res["lora"], res["base"]):
        P = len(t.prompt_ids)
        gaps += [abs(a - x) for a, x in zip(h, v[P:])]
        gaps_base += [abs(a - x) for a, x in zip(h, b[P:])]
    print(f"vLLM {res['vllm_version']} served adapter/ (rank {rank}) as a LoRA: loaded in {res['load_seconds']} s, "
          f"{time.perf_counter() - t0:.0f} s in all")
    print(f"teacher-forced log-prob of the actual tokens, {len(gaps)} response positions: mean |vLLM+LoRA - "
          f"transformers+peft| = {sum(gaps) / len(gaps):.4f} (max {max(gaps):.4f}); vLLM without the LoRA: "
          f"{sum(gaps_base) / len(gaps_base):.4f}")
    for t, text in zip(test, res["greedy_lora"]):
        print(f"  > {t.prompt}\n    {text.strip()[:160]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fidelity", "memory", "reload", "vllm-lora", "teacher", "plot", "_memory_child"])
    p.add_argument("--results", nargs="*", default=[])
    p.add_argument("--exports", nargs="*", default=None)
    p.add_argument("--export", default="/tmp/distill-bench/kl-lora")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--vllm-python", default=str(Path(__file__).resolve().parent.parent / ".venv-vllm/bin/python"))
    p.add_argument("--model", default=None)
    p.add_argument("--vector", default=str(Path(__file__).resolve().parent.parent / "exports/demo/vectors/pirate.safetensors"),
                   help="default: the demo vector (make demo writes it)")
    p.add_argument("--layer", type=int, default=17, help="default: the demo vector's recommended layer")
    p.add_argument("--coef", type=float, default=2.0)
    p.add_argument("--recipe", default="pirate")
    p.add_argument("--positions", default="response", choices=["response", "all"])
    p.add_argument("--methods", nargs="+", default=["kl-lora", "kl-full"])
    p.add_argument("--out", default="/tmp/distill-bench")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--steps-full", type=int, default=None, help="kl-full steps (default --steps)")
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr-lora", type=float, default=None, help="default: TrainConfig's")
    p.add_argument("--lr-full", type=float, default=None, help="default: TrainConfig's")
    p.add_argument("--schedule-lora", default="constant", choices=["constant", "cosine"])
    p.add_argument("--no-warm-start", action="store_true", help="train from the source weights / a zero adapter")
    p.add_argument("--gate", default="auto", choices=["auto", "neuron", "linear"], help="the warm start's gate")
    p.add_argument("--first-block-full", type=int, default=None, help="default: the steered block")
    p.add_argument("--first-block-lora", type=int, default=None,
                   help="LoRA only on blocks from this one on (default: the bake's, the steered block when warm-started)")
    p.add_argument("--targets-full", default=None, help="kl-full target modules, comma-separated")
    p.add_argument("--teacher-topk", type=int, default=0,
                   help="train on the teacher's top-k kept from sampling (no teacher forward per step)")
    p.add_argument("--schedule-full", default="constant", choices=["constant", "cosine"])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--test-samples", type=int, default=2)
    p.add_argument("--val-prompts", type=int, default=16)
    p.add_argument("--sample-batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from the work folders' checkpoints")
    p.add_argument("--setup", default="one-copy")
    p.add_argument("--processes", type=int, default=1,
                   help="memory: 2 compares FSDP2 with data parallel per process (bench/sharded_memory.py)")
    args = p.parse_args()
    {"fidelity": fidelity, "memory": memory, "vllm-lora": vllm_lora, "teacher": teacher, "reload": reload, "plot": plot_only,
     "_memory_child": memory_child}[args.what](args)


if __name__ == "__main__":
    main()
