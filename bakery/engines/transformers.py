"""The transformers check (a real run): strict reload (missing or unexpected keys fail), the
edited tensors present and non-zero, logits different from the base model, and for a bake
recorded as exact, the exactness rule of :mod:`bakery.fidelity.exact` against its runtime
reference (steering with every baked term, or ablation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bakery.engines.exported import checkpoint_tensor_names, undeclared_message
from bakery.engines.setup import Setup
from bakery.engines.verdict import Verdict
from bakery.fidelity.exact import exactness
from bakery.fidelity.metrics import measure, model_scorer
from bakery.models import read_config


def edited_tensor_names(setup: Setup) -> list[str]:
    """Tensors the bake is expected to carry (non-zero) for a bias bake; empty for other methods."""
    m = setup.manifest
    if m.method != "bias" or (m.route or "").startswith("rank1"):
        return []
    from bakery.arch import spec_for

    spec = spec_for(read_config(setup.export))
    route = spec.routes.get(m.site)
    if route is None:
        return []
    names = [f"{spec.block(t.block if m.site == 'resid-out' else t.layer)}.{route.tensor}" for t in m.terms]
    return list(dict.fromkeys(names))


def changed_tensors(export: Path, base: Path) -> tuple[list[str], list[str]]:
    """(tensors new in the export, tensors whose values differ from the base checkpoint)."""
    from safetensors import safe_open

    ex, bs = checkpoint_tensor_names(export), checkpoint_tensor_names(base)
    new = sorted(set(ex) - set(bs))
    changed = []
    for name in sorted(set(ex) & set(bs)):
        with safe_open(str(ex[name]), framework="pt") as a, safe_open(str(bs[name]), framework="pt") as b:
            ta, tb = a.get_tensor(name), b.get_tensor(name)
            if ta.shape != tb.shape or not torch.equal(ta, tb):
                changed.append(name)
    return new, changed


def verify_transformers(setup: Setup, *, trust_remote_code: bool = False) -> Verdict:
    from bakery.models import load_model

    # where the base model is (the command's --device), in float32: the exactness rule's dtype
    model, info = load_model(setup.export, dtype="float32", trust_remote_code=trust_remote_code, loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    details: dict[str, Any] = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {missing[0]}): the checkpoint lacks tensors the "
                        "config declares, so transformers would fill them with random or zero values")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + undeclared_message(setup.export, unexpected))
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape (e.g. {mismatched[0]})")

    new, changed = changed_tensors(setup.export, setup.base_dir)
    details.update(new_tensors=len(new), changed_tensors=len(changed))
    if not new and not changed:
        problems.append("the export's weights are identical to the base model's: nothing was baked")
    params = dict(model.named_parameters())
    for name in edited_tensor_names(setup):
        p = params.get(name)
        if p is None:
            problems.append(f"the edited tensor {name} is not a parameter of the loaded model")
        elif float(p.detach().abs().max()) == 0:
            problems.append(f"the edited tensor {name} is all zeros")
        details.setdefault("edited", {})[name] = None if p is None else round(float(p.detach().norm()), 6)

    traj = setup.trajectories
    bake_scorer = model_scorer(model)
    base_scorer = model_scorer(setup.base)
    diff = 0.0
    for ids, mask, P in traj.batches[:1]:
        diff = float((bake_scorer(ids, mask, P) - base_scorer(ids, mask, P))[mask.bool()].abs().max())
    details["max_logit_diff_vs_base"] = diff
    if diff < 1e-4:
        problems.append(f"the bake's logits equal the base model's (max difference {diff:.1e}): the edit "
                        "has no effect in transformers")
    fid = measure(traj, model_scorer(setup.base, setup.ref.context(setup.base)), base_scorer,
                  {"bake": bake_scorer})["bake"]
    details.update(fid.to_dict())
    summary = (f"strict reload clean; R = {fid.recovered:.5f}, top-1 {fid.top1:.3f} against "
               f"{setup.ref.kind} on {fid.tokens} response tokens")
    if setup.manifest.exact:
        ex = exactness(fid, traj, model, setup.base, setup.export)
        details["exactness"] = ex.to_dict()
        if not ex.exact:
            problems.append(f"the bake is recorded as exact but does not reproduce {setup.ref.describe()}: "
                            + "; ".join(ex.reasons()))
        else:
            summary = (f"strict reload clean; {ex.summary()}; top-1 {fid.top1:.3f} against "
                       f"{setup.ref.kind} on {fid.tokens} response tokens")
    if problems:
        return Verdict("transformers", "fail", "; ".join(problems), details=details)
    return Verdict("transformers", "pass", summary, details=details)
