"""Trajectories sampled from the runtime-steered teacher (the prompts they start from are in
:mod:`~bakery.bakers.distill.prompts`).

A trajectory is one chat prompt (token ids) and one response sampled from the steered model. The
distilled bakers learn ``KL(steered || student)`` on the response tokens of many of them. They are
saved as JSONL (a header line with the sampling settings, then one trajectory a line) so that a
second run, or a run with other training settings, reuses them.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from bakery.bakers.distill.errors import TrajectoryError
from bakery.fidelity.metrics import Trajectories
from bakery.steering.generation import generate, render_chat

FORMAT = "bakery-trajectories/1"


@dataclass
class Trajectory:
    prompt: str  # the user text
    prompt_ids: list[int]  # rendered chat prompt, no padding
    response_ids: list[int]  # sampled response up to and including end of sequence
    system: str | None = None
    # the teacher's top-k at each response position, kept from the sampling pass (--teacher-topk)
    teacher_topk_ids: list[list[int]] | None = None
    teacher_topk_logprobs: list[list[float]] | None = None

    def keep_topk(self, ids: list[list[int]], logprobs: list[list[float]]) -> None:
        """Store the teacher's top-k per response position (log-probs rounded for the JSONL)."""
        self.teacher_topk_ids = [list(map(int, row)) for row in ids]
        self.teacher_topk_logprobs = [[round(float(x), 6) for x in row] for row in logprobs]


@dataclass
class TrajectorySet:
    """Trajectories plus the settings they were sampled under (the JSONL header)."""

    items: list[Trajectory] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_response_tokens(self) -> int:
        return sum(len(t.response_ids) for t in self.items)

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSONL atomically: a header line, then one trajectory a line."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"format": FORMAT, "meta": self.meta}) + "\n")
            for t in self.items:
                f.write(json.dumps(asdict(t)) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrajectorySet":
        path = Path(path)
        if not path.is_file():
            raise TrajectoryError(f"trajectory file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError as e:
            raise TrajectoryError(f"{path} is not a bakery trajectory file (first line: {e})") from e
        if head.get("format") != FORMAT:
            raise TrajectoryError(f"{path} is not a bakery trajectory file: its first line lacks "
                                  f"\"format\": \"{FORMAT}\"")
        items = []
        for n, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            try:
                items.append(Trajectory(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise TrajectoryError(f"{path}:{n} is not a trajectory record: {e}") from e
        return cls(items, head.get("meta", {}))

    def check_matches(self, expected: dict[str, Any], *, where: str = "trajectories") -> None:
        """Refuse trajectories sampled from another teacher (model, vector, layer, coef, positions)."""
        diff = [f"{k}: file has {self.meta.get(k)!r}, this run wants {v!r}"
                for k, v in expected.items() if self.meta.get(k) != v]
        if diff:
            raise TrajectoryError(
                f"{where} were sampled from a different teacher ({'; '.join(diff)}); sample new ones "
                "(leave out --trajectories, or point it to a new file)")

    def split(self, n_val: int, seed: int = 0) -> tuple["TrajectorySet", "TrajectorySet"]:
        """(train, validation), split by prompt so a validation prompt is never trained on."""
        prompts = sorted({t.prompt for t in self.items})
        random.Random(seed).shuffle(prompts)
        val_prompts = set(prompts[:n_val])
        tr = [t for t in self.items if t.prompt not in val_prompts]
        va = [t for t in self.items if t.prompt in val_prompts]
        return TrajectorySet(tr, dict(self.meta)), TrajectorySet(va, dict(self.meta))


def collate(items: Sequence[Trajectory], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch: prompts left-padded to a common length ``P``, responses right-padded after it.

    Returns ``(input_ids, attention_mask, P)``: the layout of :func:`bakery.steering.generation.generate`,
    so a single ``prompt_len`` marks where every row's response starts.
    """
    P = max(len(t.prompt_ids) for t in items)
    T = max(len(t.response_ids) for t in items)
    ids = torch.full((len(items), P + T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), P + T), dtype=torch.long)
    for i, t in enumerate(items):
        p, r = len(t.prompt_ids), len(t.response_ids)
        ids[i, P - p:P] = torch.tensor(t.prompt_ids)
        ids[i, P:P + r] = torch.tensor(t.response_ids, dtype=torch.long)
        mask[i, P - p:P + r] = 1
    return ids, mask, P


def require_topk(items: Sequence[Trajectory]) -> None:
    """Refuse trajectories sampled without keeping the teacher's top-k."""
    missing = [t.prompt for t in items if t.teacher_topk_ids is None]
    if missing:
        raise TrajectoryError(f"{len(missing)} trajectories carry no teacher top-k (e.g. for "
                              f"{missing[0]!r}): sample them with --teacher-topk K into a new --trajectories file")


def collate_topk(items: Sequence[Trajectory]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept teacher top-k of a batch, [N, k] ids and log-probs, in the order of
    :func:`bakery.bakers.distill.train.response_logprobs` (row by row, response positions in order)."""
    require_topk(items)
    ids = torch.tensor([row for t in items for row in t.teacher_topk_ids], dtype=torch.long)
    lps = torch.tensor([row for t in items for row in t.teacher_topk_logprobs], dtype=torch.float32)
    return ids, lps


def to_fidelity(ts: TrajectorySet | Sequence[Trajectory], pad_id: int, batch_size: int = 8) -> Trajectories:
    """The same trajectories as :class:`bakery.fidelity.metrics.Trajectories`, for ``fidelity.measure``."""
    items = ts.items if isinstance(ts, TrajectorySet) else list(ts)
    out = Trajectories()
    for i in range(0, len(items), batch_size):
        out.batches.append(collate(items[i:i + batch_size], pad_id))
    return out


@torch.no_grad()
def sample(model, tok, prompts: Sequence[str], context: Callable[[int | None], ContextManager], *,
           samples_per_prompt: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
           top_p: float = 0.95, batch_size: int = 8, seed: int = 0, system: str | None = None,
           meta: dict[str, Any] | None = None, progress: bool = True, keep_topk: int = 0,
           synced_calls: int | None = None) -> TrajectorySet:
    """Sample ``samples_per_prompt`` responses per prompt from ``model`` under ``context`` (the
    steered teacher: ``lambda P: steer(model, vec, L, coef, positions=...)``), in batches.
    ``keep_topk=k`` keeps the teacher's top-k log-probabilities at every response position from
    the sampling pass, so training needs no teacher forward (:func:`kl_topk`).

    ``synced_calls=n``: the model is sharded over a process group; generation steps in sync with
    the other processes and makes exactly ``n`` batched calls (the extra ones repeat the last
    batch and are discarded), so that every process runs the same number of collectives."""
    from tqdm.auto import tqdm

    if not prompts:
        raise TrajectoryError("no prompts to sample trajectories from")
    jobs = [p for p in prompts for _ in range(samples_per_prompt)]
    rendered = [render_chat(tok, p, system) for p in jobs]
    out = TrajectorySet(meta={**(meta or {}), "temperature": temperature, "top_p": top_p,
                              "max_new_tokens": max_new_tokens, "seed": seed,
                              "samples_per_prompt": samples_per_prompt, "teacher_topk": keep_topk})
    bar = tqdm(total=len(jobs), desc="sampling teacher", unit="traj", disable=not progress)
    starts = list(range(0, len(jobs), batch_size))
    if synced_calls is not None:
        if len(starts) > synced_calls:
            raise TrajectoryError(f"{len(starts)} batches exceed the {synced_calls} synced calls asked for")
        for _ in range(synced_calls - len(starts)):
            with context(None):
                generate(model, tok, rendered[-batch_size:], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed, synced=True)
    for i in starts:
        chunk = rendered[i:i + batch_size]
        with context(None):
            g = generate(model, tok, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed + i, keep_topk=keep_topk, synced=synced_calls is not None)
        P = g.prompt_len
        for j in range(len(chunk)):
            pmask = g.attention_mask[j, :P].bool()
            resp = g.response_ids(j)
            if not resp:
                continue
            t = Trajectory(jobs[i + j], g.prompt_ids[j][pmask.cpu()].tolist(), resp, system)
            if g.topk is not None:
                t.keep_topk(g.topk[0][j, :len(resp)].tolist(), g.topk[1][j, :len(resp)].tolist())
            out.items.append(t)
        bar.update(len(chunk))
    bar.close()
    return out


def sample_vllm(model_dir: str | os.PathLike, tok, prompts: Sequence[str], *, samples_per_prompt: int = 1,
                max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
                system: str | None = None, meta: dict[str, Any] | None = None,
                eos_ids: Sequence[int] = (), keep_topk: int = 0, log=None) -> TrajectorySet:
    """Like :func:`sample`, but from a checkpoint served by vLLM: for ``positions=all`` the exact
    ``bias`` bake *is* the steered teacher. Responses end with the end-of-sequence token, as
    :func:`sample`'s do. ``keep_topk=k`` keeps vLLM's top-k log-probs of every response token
    (the unmodified distribution, before temperature and top-p), as :func:`sample` does."""
    from bakery.engines.vllm import sample_token_ids as run

    if not prompts:
        raise TrajectoryError("no prompts to sample trajectories from")
    jobs = [p for p in prompts for _ in range(samples_per_prompt)]
    ids = [tok(render_chat(tok, p, system), add_special_tokens=False)["input_ids"] for p in jobs]
    res = run(Path(model_dir), ids, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
              seed=seed, max_model_len=max(len(i) for i in ids) + max_new_tokens, logprobs=keep_topk, log=log)
    out = TrajectorySet(meta={**(meta or {}), "temperature": temperature, "top_p": top_p,
                              "max_new_tokens": max_new_tokens, "seed": seed,
                              "samples_per_prompt": samples_per_prompt, "teacher_engine": "vllm",
                              "teacher_topk": keep_topk,
                              "vllm_version": res["vllm_version"],
                              "vllm_load_seconds": res["load_seconds"],
                              "vllm_sample_seconds": res["run_seconds"]})
    eos = list(eos_ids)
    for prompt, p_ids, s in zip(jobs, ids, res["samples"]):
        resp = list(s["token_ids"])
        # vLLM ends a response with the token it stopped on; with a stop token outside the model's
        # end-of-sequence set, add one (there is no kept top-k for it, so not with keep_topk)
        if s["finish_reason"] == "stop" and eos and not keep_topk and (not resp or resp[-1] not in eos):
            resp.append(eos[0])
        if resp:
            t = Trajectory(prompt, list(p_ids), resp, system)
            if keep_topk:
                t.keep_topk(s["topk_ids"], s["topk_logprobs"])
            out.items.append(t)
    return out


@torch.no_grad()
def mean_logprob(ts: TrajectorySet | Sequence[Trajectory], scorer, pad_id: int, batch_size: int = 8) -> float:
    """Mean per-token log-probability of the responses under ``scorer`` (a
    :func:`bakery.fidelity.metrics.model_scorer`): how likely a model finds these trajectories, e.g. to
    check samples from one engine come from the same steered distribution as another's."""
    total, n = 0.0, 0
    for ids, mask, P in to_fidelity(ts, pad_id, batch_size).batches:
        lp = torch.log_softmax(scorer(ids, mask, P)[:, P - 1:-1].float(), -1)
        actual = lp.gather(2, ids[:, P:, None])[..., 0]
        keep = mask[:, P:].bool()
        total += float(actual[keep].sum())
        n += int(keep.sum())
    return total / max(n, 1)
