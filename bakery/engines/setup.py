"""The per-export setup every engine check shares: the base model, the reference steering and the
trajectories, computed once and lazily."""

from __future__ import annotations

from pathlib import Path

from bakery.fidelity.metrics import Trajectories, sample_trajectories
from bakery.fidelity.prompts import resolve_prompts
from bakery.fidelity.reference import Reference, base_model_of, check_base_matches, reference_for
from bakery.io.manifest import Manifest
from bakery.models import load_model, load_tokenizer, read_config


class Setup:
    """Everything the checks of one export share, computed once and lazily."""

    def __init__(self, export: str | Path, *, model: str | None = None, prompts=None,
                 max_new_tokens: int = 48, seed: int = 0):
        self.export = Path(export)
        if not (self.export / "config.json").is_file():
            raise FileNotFoundError(f"{self.export} is not an exported model folder (no config.json)")
        self.manifest = Manifest.load(self.export)
        self.base_dir = base_model_of(self.export, self.manifest, model)
        check_base_matches(self.export, self.manifest, self.base_dir)
        self.ref: Reference = reference_for(self.export, self.manifest, base_config=read_config(self.base_dir))
        self.prompts = resolve_prompts(prompts, self.ref.vector.trait)[0]
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self._base = self._tok = self._traj = None

    @property
    def base(self):
        if self._base is None:
            self._base = load_model(self.base_dir)
        return self._base

    @property
    def tok(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.base_dir)
        return self._tok

    @property
    def trajectories(self) -> Trajectories:
        """Sampled from the steered reference for the held-out prompts."""
        if self._traj is None:
            from bakery.steering.generation import render_chat

            rendered = [render_chat(self.tok, q) for q in self.prompts]
            self._traj = sample_trajectories(self.base, self.tok, rendered, self.ref.context(self.base),
                                             max_new_tokens=self.max_new_tokens, seed=self.seed)
        return self._traj

    def rows(self) -> list[tuple[list[int], int]]:
        """Each trajectory without padding: (token ids, index of the first response token)."""
        out = []
        for ids, mask, P in self.trajectories.batches:
            for i in range(ids.shape[0]):
                m = mask[i].bool()
                pad = int((~m[:P]).sum())
                seq = ids[i][m].tolist()
                out.append((seq, P - pad))
        return out


def joined_rows(setups: list[Setup]) -> tuple[list[tuple[list[int], int]], list[tuple[int, int]]]:
    """Every export's teacher-forced rows in one list (one engine run scores them all), and the
    span of that list each export's rows take."""
    rows: list[tuple[list[int], int]] = []
    spans: list[tuple[int, int]] = []
    for s in setups:
        mine = s.rows()
        spans.append((len(rows), len(rows) + len(mine)))
        rows.extend(mine)
    return rows, spans
