"""The checks that turn a bad bake into a clear error before anything is written: a quantized
checkpoint, a vector that does not fit, a route a target engine would silently drop."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from bakery.arch import ENGINES, BiasRoute
from bakery.bakers.errors import BakeError
from bakery.bakers.request import BakeRequest
from bakery.vectors.artifact import VectorError

def refuse_quantized(config: dict[str, Any]) -> None:
    """Bakes edit full-precision weights; a quantized checkpoint's stored values are not them."""
    q = config.get("quantization_config")
    if q:
        kind = q.get("quant_method", "unknown") if isinstance(q, dict) else type(q).__name__
        raise BakeError(
            f"this checkpoint is quantized ({kind}): bakery edits full-precision weights, and an edit "
            "of the stored values would ignore their scales. Bake the unquantized (bf16/fp16/fp32) "
            "checkpoint, then quantize the export.")


def check_terms(req: BakeRequest) -> None:
    """Every term's vector fits the model and its layer can be baked."""
    if not req.terms:
        raise BakeError("nothing to bake: give a vector (--vector or --trait) with --layer and --coef")
    for t in req.terms:
        where = f" ({t.vector_path})" if t.vector_path else ""
        try:
            t.vector.check_model(req.config)
            t.vector.check_layer(t.layer, for_bake=True)
        except VectorError as e:
            raise BakeError(f"{e}{where}") from e
        if t.coef is not None and not torch.isfinite(torch.tensor(t.coef)):
            raise BakeError(f"coef must be a finite number; got {t.coef}")
        if float(t.row().norm()) == 0:
            raise BakeError(f"row {t.layer} of the vector{where} is all zeros: nothing to bake")


def engine_verdicts(route: BiasRoute) -> dict[str, str]:
    """Verdict per engine for a bias route: ok, drop, or the launch flag that makes it work."""
    return {e: route.engines.get(e, "drop") for e in ENGINES} if route.engines else {e: "ok" for e in ENGINES}


def check_engines(route: BiasRoute, targets: Sequence[str], *, site: str, arch: str,
                  alternatives: str) -> dict[str, str]:
    """Refuse a route that a target engine would silently drop. A verdict that is a launch flag
    (sglang ``--model-impl transformers``) is allowed, unless ``sglang-native`` is demanded."""
    verdicts = engine_verdicts(route)
    problems = []
    for e in targets:
        name = "sglang" if e == "sglang-native" else e
        v = verdicts.get(name, "drop")
        if v == "drop":
            problems.append(route.engine_notes.get(name) or f"{name} would silently drop it")
        elif v != "ok" and e == "sglang-native":
            problems.append(f"sglang keeps it only when launched with {v}")
    if problems:
        alt: list[str] = []
        if site == "resid-out" and route.tensor.endswith("down_proj.bias"):
            alt.append("--site attn-out (the attention-output bias of block L, a different hook "
                       "point that all three engines load natively)")
        dropping = [e for e in ENGINES if verdicts.get(e) == "drop"]
        if dropping:
            keep = [e for e in ENGINES if e not in dropping]
            if keep:
                alt.append(f"--target-engine {','.join(keep)} (leave out {', '.join(dropping)})")
        if "sglang-native" in targets and verdicts.get("sglang") not in ("ok", "drop"):
            alt.append(f"--target-engine transformers,vllm,sglang, and launch sglang with "
                       f"{verdicts['sglang']}")
        alt.append(alternatives)
        raise BakeError(
            f"the {site} bias route on {arch} ({route.tensor}) is not safe for your target engines: "
            f"{'; '.join(problems)}. Alternatives: " + "; ".join(alt))
    return verdicts
