"""Activation capture: answer rendered prompts and average every layer's hidden states.

The residual activations of every layer are captured *while the model generates* (the decode
steps already run each response token through the model, so no second forward pass is needed):
per example they are averaged over response tokens (``response_avg``), prompt tokens
(``prompt_avg``) or taken at the last prompt token (``prompt_last``). ``two-pass`` is the
persona-vectors reference approach (generate, then one forward pass per example), kept to check
the single pass against.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bakery.placement import input_device
from bakery.steering.generation import encode_prompts, eos_token_ids
from bakery.vectors.artifact import VARIANTS

MODES = ("single-pass", "two-pass")


@dataclass
class Captured:
    """Per-example activation means, ``[N, L+1, H]`` float32, and the answers."""

    texts: list[str]
    response_tokens: list[int]
    response_avg: torch.Tensor
    prompt_avg: torch.Tensor
    prompt_last: torch.Tensor

    def variant(self, name: str) -> torch.Tensor:
        return getattr(self, name)


def _eos_ids(model, tok) -> torch.Tensor:
    return torch.tensor(eos_token_ids(model, tok) or [-1])


def _gen_kwargs(tok, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _response_ids(gen: torch.Tensor, eos: torch.Tensor, limit: int) -> list[list[int]]:
    """Generated ids per row, cut at the first end-of-sequence token (excluded) and at ``limit``."""
    out = []
    for row in gen[:, :limit].tolist():
        ids = []
        for t in row:
            if t in eos:
                break
            ids.append(t)
        out.append(ids)
    return out


@torch.no_grad()
def _capture_batch_single(model, tok, prompts: Sequence[str], *, max_new_tokens: int,
                          temperature: float, top_p: float) -> Captured:
    """Generate and capture in the same forward calls.

    A forward hook on the model reads ``hidden_states`` of every call ``generate`` makes: the
    prefill gives the prompt activations; decode step ``k`` feeds generated token ``k-1``, so its
    hidden states are that response token's. One extra token is generated so that the last kept
    token is fed too; tokens from the end of sequence on are skipped (as the reference skips
    special tokens).
    """
    dev = input_device(model)
    enc = encode_prompts(tok, prompts).to(dev)
    pmask = enc["attention_mask"].float()
    B, P = enc["input_ids"].shape
    eos = _eos_ids(model, tok).to(dev)
    st: dict[str, Any] = {"step": 0, "done": torch.zeros(B, dtype=torch.bool, device=dev)}

    def hook(module, args, kwargs, output):
        # blocks of a model spread over devices leave their states where they ran
        hs = [h.to(dev) for h in output.hidden_states]
        step = st["step"]
        st["step"] += 1
        if step == 0:
            w = pmask[:, :, None]
            st["prompt_avg"] = torch.stack([(h.float() * w).sum(1) for h in hs], 1) / w.sum(1)[:, None]
            st["prompt_last"] = torch.stack([h[:, -1].float() for h in hs], 1)
            st["resp_sum"] = torch.zeros_like(st["prompt_last"])
            st["resp_n"] = torch.zeros(B, device=dev)
            return
        if step > max_new_tokens:
            return
        fed = kwargs["input_ids"][:, -1].to(dev)
        is_eos = torch.isin(fed, eos)
        valid = ~st["done"] & ~is_eos
        st["done"] |= is_eos
        cur = torch.stack([h[:, -1].float() for h in hs], 1)
        st["resp_sum"] += cur * valid[:, None, None].float()
        st["resp_n"] += valid.float()

    def ask_for_hidden_states(module, args, kwargs):
        # set per forward call rather than through generate(), which warns about the flag
        return args, {**kwargs, "output_hidden_states": True}

    handles = [model.register_forward_pre_hook(ask_for_hidden_states, with_kwargs=True),
               model.register_forward_hook(hook, with_kwargs=True)]
    try:
        seqs = model.generate(**enc, **_gen_kwargs(tok, max_new_tokens + 1, temperature, top_p))
    finally:
        for h in handles:
            h.remove()
    ids = _response_ids(seqs[:, P:].cpu(), eos.cpu(), max_new_tokens)
    n = st["resp_n"].clamp(min=1)[:, None, None]
    return Captured(
        texts=[tok.decode(x, skip_special_tokens=True).strip() for x in ids],
        response_tokens=[len(x) for x in ids],
        response_avg=(st["resp_sum"] / n).cpu(), prompt_avg=st["prompt_avg"].cpu(),
        prompt_last=st["prompt_last"].cpu(),
    )


@torch.no_grad()
def _capture_batch_two_pass(model, tok, prompts: Sequence[str], *, max_new_tokens: int,
                            temperature: float, top_p: float) -> Captured:
    """The reference approach: generate, then one unbatched forward per example."""
    dev = input_device(model)
    enc = encode_prompts(tok, prompts).to(dev)
    P = enc["input_ids"].shape[1]
    eos = _eos_ids(model, tok)
    seqs = model.generate(**enc, **_gen_kwargs(tok, max_new_tokens, temperature, top_p))
    ids = _response_ids(seqs[:, P:].cpu(), eos, max_new_tokens)
    ra, pa, pl = [], [], []
    for i in range(len(prompts)):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()].cpu()
        full = torch.cat([prompt, torch.tensor(ids[i], dtype=prompt.dtype)])[None].to(dev)
        hs = model(input_ids=full, output_hidden_states=True).hidden_states
        stack = torch.stack([h[0].float().to(dev) for h in hs], 0)  # [L+1, S, H]
        np_ = prompt.numel()
        pa.append(stack[:, :np_].mean(1))
        pl.append(stack[:, np_ - 1])
        resp = stack[:, np_:]
        ra.append(resp.mean(1) if resp.shape[1] else torch.zeros_like(stack[:, 0]))
    return Captured(
        texts=[tok.decode(x, skip_special_tokens=True).strip() for x in ids],
        response_tokens=[len(x) for x in ids], response_avg=torch.stack(ra).cpu(),
        prompt_avg=torch.stack(pa).cpu(), prompt_last=torch.stack(pl).cpu(),
    )


def capture(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 48,
            temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
            mode: str = "single-pass", progress: str | None = None) -> Captured:
    """Answer rendered ``prompts`` and capture per-example activation means of every layer.

    Prompts are batched by length (less padding); results come back in the input order.
    """
    from tqdm.auto import tqdm

    fn = _capture_batch_single if mode == "single-pass" else _capture_batch_two_pass
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    parts: list[tuple[list[int], Captured]] = []
    torch.manual_seed(seed)
    bar = tqdm(total=len(prompts), desc=progress or "generating", unit="answer",
               disable=progress is None, file=sys.stderr)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        parts.append((idx, fn(model, tok, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p)))
        bar.update(len(idx))
    bar.close()
    n = len(prompts)
    texts: list[str] = [""] * n
    counts = [0] * n
    tensors = {v: None for v in VARIANTS}
    for idx, c in parts:
        for j, i in enumerate(idx):
            texts[i], counts[i] = c.texts[j], c.response_tokens[j]
        for v in VARIANTS:
            t = c.variant(v)
            if tensors[v] is None:
                tensors[v] = torch.empty((n, *t.shape[1:]), dtype=torch.float32)
            tensors[v][idx] = t
    return Captured(texts, counts, tensors["response_avg"], tensors["prompt_avg"], tensors["prompt_last"])
