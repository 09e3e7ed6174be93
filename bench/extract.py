"""Activation capture for ``bakery extract``: single pass (read hidden states during generation)
against the reference two-pass approach (generate, then one unbatched forward per example),
measured in the same run on the same prompts.

Both answer the same pirate-recipe prompts greedily, so they must produce the same tokens and the
same per-layer vectors (checked and printed). Wall time and process CPU time are both printed: on
a shared machine the CPU time is the steadier measure.

    .venv/bin/python bench/extract.py [--model M] [--prompts 32] [--max-new-tokens 32]
        [--batch-size 16] [--threads N] [--repeats 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bakery.extraction.extract import capture  # noqa: E402
from bakery.steering.generation import render_chat  # noqa: E402
from bakery.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from bakery.traits import load_trait_recipe  # noqa: E402


def _prompts(tok, n: int) -> tuple[list[str], torch.Tensor]:
    rec = load_trait_recipe("pirate")
    out, pol = [], []
    for q in rec.extract_questions:
        for pos, neg in rec.pairs:
            out += [render_chat(tok, q, pos), render_chat(tok, q, neg)]
            pol += [True, False]
            if len(out) >= n:
                return out, torch.tensor(pol)
    return out, torch.tensor(pol)


def _run(mode: str, model, tok, prompts, args) -> tuple[float, float, object]:
    t, c = time.perf_counter(), time.process_time()
    cap = capture(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0,
                  batch_size=args.batch_size, mode=mode)
    return time.perf_counter() - t, time.process_time() - c, cap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two methods; keep the best")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model, tok = load_model(path), load_tokenizer(path)
    prompts, pol = _prompts(tok, args.prompts)
    print(f"model {path.name}: {len(prompts)} prompts, {args.max_new_tokens} new tokens, batch "
          f"{args.batch_size}, {torch.get_num_threads()} torch thread(s)")
    best: dict[str, tuple[float, float]] = {}
    caps = {}
    for _ in range(args.repeats):
        for mode in ("two-pass", "single-pass"):
            wall, cpu, cap = _run(mode, model, tok, prompts, args)
            caps[mode] = cap
            w, c = best.get(mode, (float("inf"), float("inf")))
            best[mode] = (min(w, wall), min(c, cpu))
    a, b = caps["single-pass"], caps["two-pass"]
    ntok = sum(a.response_tokens)
    same_text = a.texts == b.texts
    vec = lambda c: c.response_avg[pol].mean(0) - c.response_avg[~pol].mean(0)
    cos = torch.nn.functional.cosine_similarity(vec(a)[1:-1], vec(b)[1:-1], dim=-1)
    maxdiff = max(float((a.variant(v) - b.variant(v)).abs().max()) for v in ("response_avg", "prompt_avg", "prompt_last"))
    for mode in ("two-pass", "single-pass"):
        w, c = best[mode]
        print(f"{mode:>12}: {w:7.1f} s wall ({len(prompts) / w:5.2f} answers/s, {ntok / w:6.1f} tokens/s), "
              f"{c:7.1f} s CPU")
    (w2, c2), (w1, c1) = best["two-pass"], best["single-pass"]
    print(f"speed-up of single-pass over two-pass: {w2 / w1:.2f}x wall, {c2 / c1:.2f}x CPU")
    print(f"same answers: {same_text}; max |activation difference| {maxdiff:.2e}; "
          f"response_avg vector cosine (rows 1..L-1) min {float(cos.min()):.6f}")
    if not same_text or float(cos.min()) < 0.999:
        sys.exit("single-pass and two-pass capture disagree")


if __name__ == "__main__":
    main()
