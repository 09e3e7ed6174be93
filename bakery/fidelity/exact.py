"""When a bake counts as exact: the one rule that ``bakery compare`` and ``bakery verify`` apply.

A bake is **exact** when, on the steered trajectories, teacher-forced over response tokens,

1. the per-token ``KL(steered || bake)`` is at most the KL that float rounding alone produces
   (:func:`rounding_kl`: the bound, derived below), and
2. the recovered effect ``R = 1 - KL(steered || bake) / KL(steered || base) >= 0.9999``.

Where the bound comes from. An exact bake computes the same function as the runtime reference
(float32 compute in both), up to two kinds of rounding:

- *compute*: the edit enters through a different float32 operation (a bias inside the linear
  instead of an addition after the block), so from the edited block on the residual stream
  differs by about one float32 rounding (relative ``eps32 = 2**-23``), and every later norm,
  attention and MLP re-rounds a slightly different input;
- *storage*: every tensor the bake wrote is rounded to the dtype it is stored in: a relative error
  of at most half that dtype's ``eps`` per element (float32 ``2**-24``, bfloat16 ``2**-8``; the new
  bias of a bf16 checkpoint is stored in bf16, an ortho bake stores its edited matrices in bf16).

For small logit differences ``δ``, ``KL(p || softmax(z - δ)) ≈ Var_p(δ) / 2``: the KL is quadratic
in these errors (a float32-only estimate, ``(eps32 * logit scale)**2 / 2``, is about 1e-13 for a
logit scale of 5), and how much of them reaches the logits depends on the model (depth, norms,
logit scale, how many tensors were written). Rather than guess that amplification, the bound
measures it on the bake itself: :func:`rounding_kl` scores the trajectories with the bake as it
is and again with every block output multiplied by ``1 + 4 * eps32 * s`` (four roundings per
block: its norm, attention, MLP and their matmuls) and every tensor the bake wrote by
``1 + eps_stored * s`` (``s``: independent random signs), and returns the mean per-token KL
between the two. Each perturbation is 2-4 times the largest rounding error of its element and
about 5 times its RMS (uniform rounding error has RMS ``ulp / sqrt(12)``), so a correct bake's KL
lies well below the bound. Measured (:data:`MEASURED`): KL / bound = 1/34 to 1/61 for bias, ortho
and two-vector bakes of a float32 tiny model and 1/26 for the bias bake of SmolLM2 (bf16), while a
bias weakened to 0.95 exceeds the bound by 8 orders of magnitude on the float32 model and 60-fold
on SmolLM2 (where its R of 0.998 fails too). The KL itself is computed in float64 from the logits'
difference (:func:`bakery.fidelity.metrics.kl_divergence`), accurate at this level; the textbook
sum in float32 is only good to about 1e-7.

``R >= 0.9999`` is a floor where the bound is loose, i.e. where the stored dtype is coarse next to
the edit's own effect. It can fail a bake whose whole difference is storage rounding: the demo's
ortho bake of SmolLM2 (every edited matrix stored in bf16, an ablation whose KL(steered || base)
is 1.26) has KL 1.27e-4 and R 0.999899. The message says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from bakery.placement import input_device
from bakery.fidelity.metrics import Fidelity, Trajectories, kl_divergence, response_logits
from bakery.steering.hooks import blocks_of

EXACT_R = 0.9999
EXPLAIN_R = 0.999  # from here up the bound is measured even when R fails, to say what is left
EPS32 = torch.finfo(torch.float32).eps
# float32 roundings a block output stands for in the jitter: the block's norm, attention and MLP
# each round their results (matmul accumulations included), and once its input differs the bake
# re-rounds every one of them differently
ACT_ROUNDINGS = 4
BOUND_TOKENS = 256  # response tokens the bound is measured on (whole batches, at least this many)
# Measured per-token KL(steered || ·), teacher-forced on the steered trajectories (module docstring).
MEASURED = {
    # tiny random Llama (float32 checkpoint), 32 response tokens
    "tiny f32 bias": {"kl": 7e-17, "bound": 4.0e-15},
    "tiny f32 bias, two vectors at two layers": {"kl": 8e-17, "bound": 3.8e-15},
    "tiny f32 ortho": {"kl": 1.6e-16, "bound": 5.5e-15},
    "tiny f32 bias x 0.95": {"kl": 1.3e-7, "R": 0.999989},
    # SmolLM2-135M (bf16 checkpoint): demo pirate vector, layer 17, coef 2, 8 demo prompts, 256 tokens
    "smollm2 bias (bias stored in bf16)": {"kl": 7.9e-7, "R": 0.9999987, "bound": 2.0e-5},
    "smollm2 bias x 0.95": {"kl": 1.25e-3, "R": 0.99788},
    # a quick contrastive pirate vector, layer 16, coef 2, 128 tokens
    "smollm2 bias x 0.99": {"kl": 1.2e-4, "R": 0.99989, "bound": 8.4e-5},
    # ortho at layer 22 (demo), every o_proj/down_proj/embedding stored back in bf16
    "smollm2 ortho": {"kl": 1.27e-4, "R": 0.999899},
}


@dataclass
class Exactness:
    """The verdict of the exactness rule for one bake."""

    kl: float  # mean per-token KL(steered || bake)
    recovered: float  # R
    kl_bound: float | None  # the rounding bound; None when R is far from passing
    tokens: int = 0
    storage: str | None = None  # the coarsest dtype the edited tensors are stored in
    unmeasured: str | None = None  # why the bound could not be measured, when it could not

    @property
    def exact(self) -> bool:
        return self.recovered >= EXACT_R and self.kl_bound is not None and self.kl <= self.kl_bound

    def reasons(self) -> list[str]:
        """Why the bake is not exact (empty when it is)."""
        out = []
        if not self.recovered >= EXACT_R:
            why = f"R = {self.recovered:.6f} < {EXACT_R} (KL {self.kl:.2e} per token)"
            if self.kl_bound is not None and self.kl <= self.kl_bound and self.storage not in (None, "float32"):
                why += (f"; the KL is within the rounding bound {self.kl_bound:.2e}: what is left is the "
                        f"rounding of the edited tensors stored in {self.storage}, large next to this "
                        "edit's own effect")
            out.append(why)
        if self.unmeasured:
            out.append(f"the rounding bound was not measured: {self.unmeasured}")
        if self.kl_bound is not None and not self.kl <= self.kl_bound:
            out.append(f"KL {self.kl:.2e} per token > {self.kl_bound:.2e}, the KL that float rounding "
                       "of the activations and of the stored edit produces")
        return out

    def summary(self) -> str:
        if self.exact:
            return (f"exact: KL {self.kl:.2e} <= rounding bound {self.kl_bound:.2e}, "
                    f"R = {self.recovered:.6f} >= {EXACT_R}")
        return "not exact: " + "; ".join(self.reasons())

    def to_dict(self) -> dict[str, Any]:
        return {"exact": self.exact, "kl": self.kl, "kl_bound": self.kl_bound, "R": self.recovered,
                "R_min": EXACT_R, "tokens": self.tokens, "storage": self.storage,
                "bound_unmeasured": self.unmeasured, "summary": self.summary()}


def exactness(fid: Fidelity, traj: Trajectories, model, base_model, export: str | Path | None = None) -> Exactness:
    """The exactness rule for a bake whose fidelity ``fid`` was measured on ``traj``: ``model`` is
    the loaded bake, ``base_model`` the model it was baked from, ``export`` its folder (for the
    dtypes its tensors are stored in). The bound is measured only when R is near passing."""
    bound = storage = None
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded and fid.recovered >= EXPLAIN_R:
        why = (f"{len(offloaded)} parameters of the bake are offloaded (e.g. {offloaded[0]}), and the bound "
               "jitters the loaded weights in place; rerun with the model in memory (--device-map none, "
               "or a device it fits) to decide exactness")
        return Exactness(kl=fid.kl, recovered=fid.recovered, kl_bound=None, tokens=fid.tokens, unmeasured=why)
    if fid.recovered >= EXPLAIN_R:
        edited = edited_parameters(model, base_model, export)
        bound = rounding_kl(traj, model, edited)
        if edited:
            coarsest = max(edited.values())
            storage = next((str(d).removeprefix("torch.") for d in (torch.float32, torch.bfloat16, torch.float16)
                            if torch.finfo(d).eps == coarsest), f"a dtype with eps {coarsest:.1e}")
    return Exactness(kl=fid.kl, recovered=fid.recovered, kl_bound=bound, tokens=fid.tokens, storage=storage)


# ---- the bound ---------------------------------------------------------------------------------
def _signs(shape, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, tuple(shape), generator=g).float().mul_(2).sub_(1)


@contextlib.contextmanager
def rounding_jitter(model, edited: dict[str, float], seed: int = 0) -> Iterator[None]:
    """Inside: ``model`` with each parameter in ``edited`` multiplied by ``1 + eps * s`` and every
    block output by ``1 + 4 * eps32 * s`` (random signs ``s``, reproducible from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    handles = []

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        s = _signs(h.shape, g).to(device=h.device, dtype=h.dtype)
        h = h * (1 + ACT_ROUNDINGS * EPS32 * s)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    try:
        with torch.no_grad():
            for name, eps in edited.items():
                p = params[name]
                saved[name] = p.detach().clone()
                p.mul_(1 + eps * _signs(p.shape, g).to(device=p.device, dtype=p.dtype))
        handles = [b.register_forward_hook(hook) for b in blocks_of(model)]
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@torch.no_grad()
def rounding_kl(traj: Trajectories, model, edited: dict[str, float], seed: int = 0) -> float:
    """Mean per-token ``KL(model || model under rounding_jitter)`` over the response tokens of
    ``traj``: the bound of the exactness rule (see the module docstring)."""

    def logits(ids, mask, P):
        dev = input_device(model)
        out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        return response_logits(out.float().cpu(), mask, P)

    batches, count = [], 0
    for ids, mask, P in traj.batches:  # enough whole batches for BOUND_TOKENS tokens: an average
        if count >= BOUND_TOKENS:
            break
        batches.append((ids, mask, P))
        count += int(mask[:, P:].sum())
    clean = [logits(ids, mask, P) for ids, mask, P in batches]
    total, n = 0.0, 0
    with rounding_jitter(model, edited, seed):
        for (ids, mask, P), a in zip(batches, clean):
            total += float(kl_divergence(a, logits(ids, mask, P)).sum())
            n += a.shape[0]
    return total / max(n, 1)


def edited_parameters(model, base_model, export: str | Path | None = None) -> dict[str, float]:
    """Parameters of the loaded bake that differ from the base model's (or that the base lacks),
    each with the eps of the dtype ``export`` stores it in (float32 when unknown)."""
    base = base_model.state_dict()
    edited = []
    for name, p in model.named_parameters():
        b = base.get(name)
        if b is None or b.shape != p.shape or not torch.equal(b.to(p.device, p.dtype), p.detach()):
            edited.append(name)
    return storage_eps(export, model.config, edited) if export is not None else {n: EPS32 for n in edited}


def storage_eps(export: str | Path, config, names: list[str]) -> dict[str, float]:
    """``{name: eps of the dtype the checkpoint in export stores parameter name in}``; a name
    bakery cannot resolve gets the coarsest float dtype of the checkpoint."""
    from bakery.arch import spec_for
    from bakery.io.checkpoint import CheckpointReader
    from bakery.io.names import TensorNames

    if not names:
        return {}
    reader = CheckpointReader(export)
    resolve = TensorNames(reader.keys(), spec_for(config), config)
    floats = [t.torch_dtype for t in reader.tensors.values() if t.torch_dtype.is_floating_point]
    coarsest = max((float(torch.finfo(d).eps) for d in floats), default=EPS32)
    out = {}
    for n in names:
        found = resolve.find(n)
        dtype = reader.tensors[found].torch_dtype if found is not None else None
        out[n] = float(torch.finfo(dtype).eps) if dtype is not None and dtype.is_floating_point else coarsest
    return out
