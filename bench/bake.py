"""Speed and memory of the streaming closed-form bakers against a plain copy of the files and
against the obvious alternative (load with transformers, edit, ``save_pretrained``), same run.

A synthetic sharded bf16 checkpoint with Llama shapes (default: TinyLlama-1.1B shapes, 2.2 GB) is
written to a temporary folder and deleted at the end. Each contender runs in its own process so
its peak resident memory (``ru_maxrss``) is its own; "working" memory is that peak minus the same
process's resident memory right after its imports (Python, torch, transformers).

    .venv/bin/python bench/bake.py [--layers 22] [--hidden 2048] [--intermediate 5632] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    """VmHWM: this process image's peak RSS (ru_maxrss would include the parent's before exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_checkpoint(folder: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int,
                    kv_heads: int, shard_bytes: int) -> int:
    """Random bf16 Llama checkpoint, sharded with an index, written by bakery's own writer."""
    import torch

    from bakery.io.checkpoint import OutTensor, ShardedWriter

    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * hd, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * hd),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    gen = torch.Generator().manual_seed(0)

    def make(shape):
        return lambda: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    plan = [OutTensor(n, "BF16", s, produce=make(s)) for n, s in sorted(shapes.items())]
    folder.mkdir(parents=True)
    ShardedWriter(folder, max_shard_bytes=shard_bytes).write(plan)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(p.stat().st_size for p in folder.iterdir())


# ---- contenders (each runs in a child process: `bench/bake.py --child NAME SRC OUT VEC`) -----
def child(name: str, src: str, out: str, vec: str, layer: int) -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from bakery.bakers import bake

    base = _rss_mb()
    t = time.perf_counter()
    if name == "copy":
        shutil.copytree(src, out)
    elif name in ("bias", "ortho"):
        bake(name, src, [(vec, layer, 2.0 if name == "bias" else None)], out, progress=False)
    elif name in ("hf-bias", "hf-ortho"):
        hf_edit(name, src, out, vec, layer)
    else:
        raise SystemExit(f"unknown contender {name}")
    return {"name": name, "seconds": time.perf_counter() - t, "peak_mb": _peak_mb(), "base_mb": base}


def hf_edit(name: str, src: str, out: str, vec: str, layer: int) -> None:
    """The obvious way: instantiate the model, edit its parameters, save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from bakery.vectors.load import load_vector

    v = load_vector(vec).vectors[layer]
    kw = {"mlp_bias": True} if name == "hf-bias" else {}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, **kw)
    with torch.no_grad():
        if name == "hf-bias":
            for i, blk in enumerate(model.model.layers):
                for lin in (blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj):
                    lin.bias.zero_()
            model.model.layers[layer - 1].mlp.down_proj.bias.copy_(2.0 * v)
        else:
            r = (v / v.norm()).float()
            model.model.embed_tokens.weight.copy_(
                model.model.embed_tokens.weight.float().addr_(model.model.embed_tokens.weight.float() @ r, r, alpha=-1))
            for blk in model.model.layers:
                for lin in (blk.self_attn.o_proj, blk.mlp.down_proj):
                    W = lin.weight.float()
                    lin.weight.copy_(W.addr_(r, r @ W, alpha=-1))
    model.save_pretrained(out)


def run_child(name: str, src: Path, out: Path, vec: Path, layer: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, str(src), str(out), str(vec), str(layer)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if res.returncode:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=5, metavar=("NAME", "SRC", "OUT", "VEC", "LAYER"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="source shard size")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--dir", default=None, help="where to put the temporary checkpoint")
    args = ap.parse_args()
    if args.child:
        name, src, out, vec, layer = args.child
        print(json.dumps(child(name, src, out, vec, int(layer))))
        return

    import torch

    from bakery.vectors.artifact import VectorArtifact

    work = Path(tempfile.mkdtemp(prefix="bakery-bench-", dir=args.dir))
    try:
        src = work / "src"
        t = time.perf_counter()
        size = make_checkpoint(src, args.layers, args.hidden, args.intermediate, args.vocab,
                               heads=32, kv_heads=4, shard_bytes=int(args.shard_gb * 1e9))
        shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic Llama checkpoint: {size / 1e9:.2f} GB bf16 in {shards} shards, "
              f"{args.layers} layers, hidden {args.hidden} (written in {time.perf_counter() - t:.0f} s)")
        vec = work / "v.safetensors"
        VectorArtifact(torch.randn(args.layers + 1, args.hidden), {"trait": "bench"}).save(vec)
        layer = args.layers // 2
        names = ["copy", "bias", "ortho", "copy"] + ([] if args.skip_hf else ["hf-bias", "hf-ortho"])
        results: dict[str, list[dict]] = {}
        for n in names:
            r = run_child(n, src, work / f"out-{n}", vec, layer)
            results.setdefault(n, []).append(r)
            print(f"  {n:9s} {r['seconds']:7.1f} s   peak RSS {r['peak_mb']:7.0f} MB "
                  f"(after imports {r['base_mb']:.0f} MB)", flush=True)
        copy_s = min(r["seconds"] for r in results["copy"])
        size_mb = size / 2**20
        print(f"\nplain copy of the files: {copy_s:.1f} s; checkpoint {size_mb:.0f} MB")
        print(f"{'contender':10s} {'time/copy':>10s} {'peak/ckpt':>10s} {'working/ckpt':>13s}")
        for n in names:
            if n == "copy":
                continue
            r = results[n][0]
            print(f"{n:10s} {r['seconds'] / copy_s:10.2f} {r['peak_mb'] / size_mb:10.3f} "
                  f"{(r['peak_mb'] - r['base_mb']) / size_mb:13.3f}")
        print("\n(aim: bakers under 1.5x the copy time and peak memory under 0.25 of the checkpoint; "
              "working = peak minus the process's RSS after importing torch and transformers)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
