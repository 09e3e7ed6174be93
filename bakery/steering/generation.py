"""Chat templating and batched generation shared by steer, extract, compare and distill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from bakery.errors import BakeryError
from bakery.placement import input_device


class NoChatTemplate(BakeryError):
    """The tokenizer has no chat template and the caller asked for chat formatting."""


def chat_messages(user: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def render_chat(tok, user: str, system: str | None = None) -> str:
    """The prompt text for one user turn (and optional system prompt), generation prompt added.

    Templates that reject a system role (Gemma's raises) get the system text folded into the first
    user turn.
    """
    if not getattr(tok, "chat_template", None):
        raise NoChatTemplate(
            f"the tokenizer of {getattr(tok, 'name_or_path', 'this model')} has no chat template; "
            "use an instruction-tuned model, or pass --no-chat to feed raw text"
        )
    try:
        return tok.apply_chat_template(chat_messages(user, system), tokenize=False,
                                       add_generation_prompt=True)
    except Exception:
        if not system:
            raise
        folded = f"{system}\n\n{user}"
        return tok.apply_chat_template(chat_messages(folded), tokenize=False, add_generation_prompt=True)


def encode_prompts(tok, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded batch of already-rendered prompt texts (templates carry their own specials)."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)


@dataclass
class Generation:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    attention_mask: torch.Tensor  # [B, P + T]
    sequences: torch.Tensor  # [B, P + T]
    texts: list[str]
    topk: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, log-probs) [B, T, k] of the raw logits

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    def response_ids(self, i: int) -> list[int]:
        """Generated ids of row ``i`` up to (not including) padding after end of sequence."""
        resp = self.sequences[i, self.prompt_len:]
        keep = self.attention_mask[i, self.prompt_len:].bool()
        return resp[keep].tolist()


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0,
             suppress_eos: bool = False, keep_topk: int = 0, synced: bool = False) -> Generation:
    """Generate for rendered prompt texts in one left-padded batch.

    ``synced``: the model is sharded over a process group (every forward is a collective), so
    every process keeps stepping until all are done (transformers' ``synced_gpus``).

    ``temperature=0`` is greedy. The returned attention mask marks generated tokens after the end
    of sequence as padding, so teacher-forced scoring can skip them. ``keep_topk=k`` also returns
    the top-k log-probabilities of the model's own (untempered, unfiltered) distribution at every
    generated position: the distribution the sampling pass computed anyway.
    """
    dev = input_device(model)
    enc = encode_prompts(tok, prompts).to(dev)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if synced:
        kwargs["synced_gpus"] = True
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if suppress_eos:
        kwargs.update(min_new_tokens=max_new_tokens)
    topk = None
    if keep_topk:
        out = model.generate(**enc, **kwargs, output_logits=True, return_dict_in_generate=True)
        seqs = out.sequences
        steps = [torch.log_softmax(step.float(), -1).topk(keep_topk, dim=-1) for step in out.logits]
        topk = (torch.stack([t.indices for t in steps], 1).cpu(), torch.stack([t.values for t in steps], 1).cpu())
    else:
        seqs = model.generate(**enc, **kwargs)
    P = enc["input_ids"].shape[1]
    seqs = seqs.to(dev)
    gen = seqs[:, P:]
    eos_ids = torch.tensor(eos_token_ids(model, tok) or [-1], device=dev)
    alive = torch.ones(gen.shape[0], dtype=torch.bool, device=gen.device)
    gen_mask = torch.zeros_like(gen)
    for t in range(gen.shape[1]):
        gen_mask[:, t] = alive.long()
        if not suppress_eos:
            alive &= ~torch.isin(gen[:, t], eos_ids)
    mask = torch.cat([enc["attention_mask"], gen_mask], dim=1)
    texts = [tok.decode(gen[i][gen_mask[i].bool()], skip_special_tokens=True).strip()
             for i in range(gen.shape[0])]
    return Generation(enc["input_ids"], mask, seqs, texts, topk)


def eos_token_ids(model, tok) -> list[int]:
    """Every id that ends a sequence: the generation config's (one or a list) and the tokenizer's."""
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return sorted(ids)
