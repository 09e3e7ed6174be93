"""Speed of ``bakery persist`` (KV cache, one forward per new token) against the per-token
re-trace approach (the whole sequence recomputed for every new token), measured in the same run.

Both do the same work: steer N tokens, then M free, recording (h . v)/|v| at the layer for every
generated token, greedy. The bench checks they give the same tokens and projections, then prints
the ratio. Without --vector a seeded random direction stands in (speed does not depend on it).

    .venv/bin/python bench/persist.py [--model M] [--vector V] [-n 32] [-k 64] [--prompts 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bakery.steering.generation import encode_prompts, render_chat  # noqa: E402
from bakery.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from bakery.fidelity.persist import DEFAULT_PROMPTS, check_vector_for_persist, logits_kwargs, trace_batch  # noqa: E402
from bakery.steering.hooks import Steering, SteeringTerm  # noqa: E402
from bakery.naming import describe_layer
from bakery.vectors.artifact import VectorArtifact
from bakery.vectors.load import load_vector  # noqa: E402


@torch.no_grad()
def retrace(model, tok, texts, *, layer: int, direction: torch.Tensor, coef: float,
            steer_tokens: int, total_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: for every new token, one forward pass over the whole sequence so far (logits
    of the last position only, so the difference measured is the KV cache alone)."""
    enc = encode_prompts(tok, texts)
    ids, mask = enc["input_ids"], enc["attention_mask"].long()
    P = ids.shape[1]
    unit = direction / direction.norm()
    proj = torch.empty(ids.shape[0], total_tokens)
    for t in range(total_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # steering on the positions that produced the first steer_tokens tokens, as persist does
        with Steering(model, [SteeringTerm(layer, direction, coef)], positions="prompt",
                      prompt_len=P - 1 + steer_tokens):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                        use_cache=False, **logits_kwargs(model))
        proj[:, t] = out.hidden_states[layer][:, -1].float() @ unit
        nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, proj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--vector", default=None)
    ap.add_argument("--layer", type=int, default=16)
    ap.add_argument("--coef", type=float, default=2.0)
    ap.add_argument("-n", "--steer-tokens", type=int, default=32)
    ap.add_argument("-k", "--sample-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=4, help="how many built-in prompts (one batch)")
    args = ap.parse_args()

    path = resolve_model(args.model)
    model, tok = load_model(path), load_tokenizer(path)
    cfg = model.config
    if args.vector:
        vec = load_vector(args.vector, num_layers=cfg.num_hidden_layers)
    else:
        g = torch.Generator().manual_seed(0)
        vec = VectorArtifact(torch.randn(cfg.num_hidden_layers + 1, cfg.hidden_size, generator=g))
        vec.vectors *= 35.0 / vec.vectors[args.layer].norm()  # about the pirate vector's norm at 16
    direction = check_vector_for_persist(vec, cfg, args.layer)
    prompts = (list(DEFAULT_PROMPTS) * 8)[:args.prompts]
    texts = [render_chat(tok, p) for p in prompts]
    N, T = args.steer_tokens, args.steer_tokens + args.sample_tokens
    kw = dict(layer=args.layer, direction=direction, coef=args.coef, steer_tokens=N, total_tokens=T)

    trace_batch(model, tok, texts[:1], **{**kw, "total_tokens": 2}, temperature=0.0)  # warm-up
    t0 = time.perf_counter()
    cached = trace_batch(model, tok, texts, **kw, temperature=0.0, suppress_eos=False)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids, proj = retrace(model, tok, texts, **kw)
    t_retrace = time.perf_counter() - t0

    same = (cached.sequences == ids).all(dim=1)
    first_diff = [int((cached.sequences[i] != ids[i]).nonzero()[0]) - cached.prompt_len if not s else T
                  for i, s in enumerate(same.tolist())]
    agree = min(first_diff)  # projections compared where both runs read the same tokens
    gap = (cached.projection[:, :max(agree, 1)] - proj[:, :max(agree, 1)]).abs().max().item()
    print(f"model {cfg._name_or_path or path}, {describe_layer(args.layer)}, coef {args.coef:g}, "
          f"{len(prompts)} prompts x ({N} steered + {args.sample_tokens} free) tokens, "
          f"prompt length {cached.prompt_len}, torch threads {torch.get_num_threads()}")
    print(f"KV cache (bakery persist):  {t_cached:7.2f} s  ({len(prompts) * T / t_cached:6.1f} tok/s)")
    print(f"per-token re-trace:         {t_retrace:7.2f} s  ({len(prompts) * T / t_retrace:6.1f} tok/s)")
    print(f"speed-up: {t_retrace / t_cached:.2f}x")
    print(f"same tokens in {int(same.sum())}/{len(prompts)} rows (first difference after "
          f"{agree} tokens); max |projection gap| over the shared tokens {gap:.2e}")


if __name__ == "__main__":
    main()
