"""The ``ortho`` baker: directional ablation written into the weights.

``W <- (I - r r^T) W`` (and ``b <- b - (r . b) r``) for every matrix that writes the residual
stream: the embeddings, each attention output and each MLP down-projection, in float32, stored in
the source dtype. ``r`` is the unit vector of ``v[L]`` or, with ``per_layer``, block ``i`` uses
``v[i+1]`` (the embedding uses block 0's direction, as :class:`bakery.steering.hooks.Ablation` does).

Tied embeddings: the input embedding and the output head are one matrix. Ablating it would also
change the output head, which runtime ablation does not, so bakery offers the two honest choices:
``embeddings="ablate"`` unties them (the embedding rows are ablated, the output head is written as
a copy of the original matrix: ``vocab x hidden`` more parameters), ``embeddings="keep"`` leaves the
shared matrix alone (then the reference is ablation without the embedding output).

``add=COEF`` re-adds ``COEF * r`` at the output of block ``L-1`` through the exact bias route
(affine editing: the direction is fixed to one value instead of removed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bakery.arch import num_layers_of, set_text_key, tied_embeddings
from bakery.bakers.registry import register
from bakery.bakers.base import ClosedFormBaker
from bakery.bakers.errors import BakeError
from bakery.bakers.plan import BakePlan
from bakery.bakers.rehost import arch_name
from bakery.bakers.request import BakeRequest
from bakery.bakers.bias import TARGET_ENGINE_HELP, plan_bias_terms
from bakery.bakers.config import BakerConfig, fmt_float, option
from bakery.io.checkpoint import CheckpointReader

BIPOLAR_WARNING = (
    "ablation removes the whole direction, both of its poles: if the opposite of '{trait}' is "
    "itself a behaviour you care about (e.g. the model's normal register), it is removed too. "
    "Check the baked model's neutral drift (bakery compare) before shipping it.")


def parse_blocks(value: Any, n: int) -> list[int] | None:
    """``None``/"all" -> None; "10-20" / "3,5,7" / [3, 5] -> sorted block indices (0-based)."""
    if value is None or value == "all":
        return None
    items: list[int] = []
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        for p in parts:
            p = str(p).strip()
            if "-" in p:
                a, b = (int(x) for x in p.split("-", 1))
                items.extend(range(a, b + 1))
            elif p:
                items.append(int(p))
    except ValueError:
        raise BakeError(f"blocks must look like '10-20' or '3,5,7' (0-based blocks); got {value!r}") from None
    bad = [b for b in items if not 0 <= b < n]
    if bad or not items:
        raise BakeError(f"blocks {bad or value} out of range: this model has blocks 0..{n - 1}")
    return sorted(set(items))


def _unit(v: torch.Tensor, what: str) -> torch.Tensor:
    norm = v.float().norm()
    if norm == 0:
        raise BakeError(f"{what} is all zeros: there is no direction to ablate")
    return v.float() / norm


_BLOCK_FLOATS = 1 << 18  # float32 working block of the projections: 1 MB, stays in cache


def _row_blocks(W: torch.Tensor):
    rows = max(1, _BLOCK_FLOATS // max(1, W[0].numel()))
    return [(i, min(i + rows, W.shape[0])) for i in range(0, W.shape[0], rows)]


def project_rows(W: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Rows of ``W`` (shape [N, hidden]) with ``r`` projected out: ``W - (W r) r^T``, in place, in
    ``W``'s dtype with float32 math one cache-sized block of rows at a time."""
    for a, b in _row_blocks(W):
        x = W[a:b].float()  # a view when W is float32
        W[a:b] = x.addr_(x @ r, r, alpha=-1)
    return W


def project_cols(W: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Columns of ``W`` (shape [hidden, N]) with ``r`` projected out: ``W - r (r^T W)``, in place,
    in ``W``'s dtype: one blocked pass sums ``r^T W`` in float32, a second subtracts it."""
    blocks = _row_blocks(W)
    c = torch.zeros(W.shape[1], dtype=torch.float32)
    for a, b in blocks:
        c.addmv_(W[a:b].float().T, r[a:b])
    for a, b in blocks:
        W[a:b] = W[a:b].float().addr_(r[a:b], c, alpha=-1)
    return W


def project_axis(W: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """``W`` with ``r`` projected out along its hidden axis ``axis``, in place, in ``W``'s dtype:
    a bias ``[hidden]`` or ``[experts, hidden]``, a weight ``[hidden, in]`` (axis 0), Conv1D or
    embedding rows (axis 1 of 2), fused experts ``[E, hidden, in]`` (axis 1) or ``[E, in, hidden]``
    (axis 2)."""
    if W.ndim == 1:
        x = W.float()
        W.copy_(x - (x @ r) * r)
    elif axis == W.ndim - 1:
        project_rows(W.view(-1, W.shape[-1]), r)
    elif W.ndim == 2 and axis == 0:
        project_cols(W, r)
    elif W.ndim == 3 and axis == 1:
        for e in range(W.shape[0]):
            project_cols(W[e], r)
    else:
        raise BakeError(f"internal error: cannot ablate along axis {axis} of a {W.ndim}-D tensor")
    return W


@dataclass
class OrthoConfig(BakerConfig):
    """``--method ortho``: the direction projected out of every residual write."""

    embeddings: str | None = option(None, "ablate the embedding output too (default; tied embeddings "
                                    "get untied) or keep the embeddings", flag="--embeddings",
                                    choices=("ablate", "keep"))
    blocks: str | None = option(None, "blocks to ablate, e.g. 10-20 or 3,5,7 (0-based; default all)",
                                flag="--blocks", kind=str)
    per_layer: bool | None = option(None, "block i uses the direction v[i+1] instead of v[L]",
                                    flag="--per-layer", kind=bool, is_flag=True)
    add: float | None = option(None, "re-add ADD * r at the output of block L-1 through the exact bias "
                               "route (affine edit)", flag="--add", kind=float)
    target_engines: str | None = option(None, "with --add: " + TARGET_ENGINE_HELP, flag="--target-engine",
                                        kind=str)

    def check(self) -> None:
        if isinstance(self.blocks, (list, tuple)):  # a recipe may list them
            self.blocks = ",".join(map(str, self.blocks))
        if isinstance(self.blocks, int):
            self.blocks = str(self.blocks)
        super().check()
        if self.target_engines is not None and not self.add:
            raise BakeError("--target-engine checks where the bias of --add survives; plain ablation "
                            "adds no parameter and loads in every engine. Give --add C or drop --target-engine")


@register("ortho")
class OrthoBaker(ClosedFormBaker):
    """Directional ablation, optionally with a re-added constant (``add``)."""

    config_class = OrthoConfig
    uses_coef = False
    max_terms = 1

    def name_tags(self, req: BakeRequest) -> tuple[list[str], list[str]]:
        return [], ([f"add{fmt_float(req.cfg.add)}"] if req.cfg.add else [])

    def plan(self, req: BakeRequest, reader: CheckpointReader) -> BakePlan:
        spec = req.spec
        arch = arch_name(req.config)
        if spec.sandwich:
            raise BakeError(
                f"{arch} writes the residual stream through a norm (sandwich norm), so no weight "
                "edit equals runtime ablation there. Alternatives: --method kl-lora (distil the "
                "ablated model), or --method bias --route rank1 for a steering bake.")
        term = req.terms[0]
        n = num_layers_of(req.config)
        cfg = req.cfg
        embeddings = cfg.embeddings or "ablate"
        blocks = parse_blocks(cfg.blocks, n)
        per_layer = bool(cfg.per_layer)
        block_list = list(range(n)) if blocks is None else blocks
        if per_layer:
            dirs = {i: _unit(term.vector.row(i + 1), f"row {i + 1} of the vector") for i in block_list}
            if embeddings == "ablate" and 0 not in dirs:
                dirs_embed = _unit(term.vector.row(1), "row 1 of the vector")
            else:
                dirs_embed = dirs.get(0, next(iter(dirs.values())))
        else:
            r = _unit(term.row(), f"row {term.layer} of the vector")
            dirs = {i: r for i in block_list}
            dirs_embed = r

        plan = BakePlan(reader=reader, config=dict(req.config))
        names = plan.names
        tied = tied_embeddings(req.config)
        lm_head = spec.head_weight()
        untied = False
        embed = [w.name for w in names.embeddings()]
        if embeddings == "ablate":
            if tied and plan.find(lm_head) is None:
                plan.copy_as(lm_head, embed[0])
                untied = True
            if tied:
                set_text_key(plan.config, "tie_word_embeddings", False)
                untied = True
            for e in embed:
                plan.edit(e, lambda W, r=dirs_embed: project_rows(W, r), rowwise=True, native=True)
        edited = 0
        for i in block_list:
            r = dirs[i]
            for w in names.block_writers(i):
                ndim = len(reader.tensors[w.name].shape)
                plan.edit(w.name, lambda W, r=r, a=w.axis: project_axis(W, r, a),
                          rowwise=ndim == 2 and w.axis == 1, native=w.kind != "bias")
                edited += w.kind in ("expert", "shared")
        if edited:
            plan.notes.append(f"mixture of experts: {edited} expert and shared-expert down-projection "
                              "tensors ablated (every expert of every edited block)")

        plan.route = "ortho"
        plan.exact = True
        plan.engines = {"transformers": "ok", "vllm": "ok", "sglang": "ok"}
        plan.ablation = {
            "direction": "per-layer rows v[i+1]" if per_layer else f"v[{term.layer}]",
            "layer": term.layer,
            "blocks": "all" if blocks is None else blocks,
            "embeddings": embeddings,
            "untied": untied,
            "per_layer": per_layer,
        }
        if embeddings == "ablate" and untied:
            plan.notes.append(
                "tied embeddings were untied: the input embedding rows are ablated, the output head "
                "keeps the original matrix (stored as lm_head.weight, "
                f"{reader.tensors[embed[0]].shape[0]} x {reader.tensors[embed[0]].shape[1]} more "
                "parameters); "
                "reference: runtime ablation including the embedding output")
        elif embeddings == "keep":
            plan.notes.append("embeddings left untouched; reference: runtime ablation of the "
                              "attention and MLP writes only (Ablation(embeddings=False))")
        plan.warnings.append(BIPOLAR_WARNING.format(trait=term.trait))

        add = cfg.add
        if add is not None and float(add) != 0.0:
            plan_bias_terms(req, reader, plan, "resid-out", {term.block: float(add) * _unit(term.row(), "v")})
            plan.route = "ortho+bias"
            plan.ablation["add"] = float(add)
            plan.notes.append(f"affine edit: after ablation, {float(add):g} * r is added at the output "
                              f"of block {term.block} through the {spec.routes['resid-out'].tensor} bias")
        return plan
