"""The persistence summary: mean projections per phase and condition, and the half-life of the
decay after steering stops."""

from __future__ import annotations

from typing import Any, Sequence

from bakery.fidelity.persist.settings import CONDITIONS, STEERED, SWITCH, UNSTEERED, PersistSettings, Trace
from bakery.stats import mean_of
from bakery.naming import describe_layer


def _mean_curve(traces: Sequence[Trace], length: int, own: bool) -> list[float | None]:
    """Per-token mean over traces (``None`` where no trace reaches that token)."""
    out: list[float | None] = []
    for t in range(length):
        vals = [(tr.own if own else tr.projection)[t] for tr in traces if t < len(tr.projection)]
        vals = [v for v in vals if v is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def _smooth(values: Sequence[float | None], window: int) -> list[float | None]:
    out: list[float | None] = []
    for i in range(len(values)):
        out.append(mean_of(values[max(0, i - window + 1):i + 1]))
    return out


def half_life(free_curve: Sequence[float | None], baseline: float, start_excess: float,
              window: int = 3) -> int | None:
    """Free-phase tokens until the (trailing-mean) excess over ``baseline`` first falls to half of
    ``start_excess``; 0 means at the first free token, ``None`` never within the phase or no excess."""
    if start_excess is None or start_excess <= 0:
        return None
    for k, v in enumerate(_smooth(free_curve, window)):
        if v is not None and v - baseline <= start_excess / 2:
            return k
    return None


PRE_SWITCH_WINDOW = 8


def _half_life_note(value: int | None, start: float, sample_tokens: int) -> str:
    if start <= 0:
        return "no excess over the unsteered level before the switch"
    if value is None:
        return f"not reached within {sample_tokens} free tokens"
    return f"{value} tokens"


def summarize(traces: Sequence[Trace], settings: PersistSettings, vector_norm: float) -> dict[str, Any]:
    """Mean projections per phase and condition, and the half-life of the decay after the switch."""
    N, T = settings.steer_tokens, settings.total_tokens
    by_cond: dict[str, list[Trace]] = {}
    for tr in traces:
        by_cond.setdefault(tr.condition, []).append(tr)
    conditions: dict[str, Any] = {}
    curves: dict[str, dict[str, list[float | None]]] = {}
    for cond, trs in by_cond.items():
        raw, own = _mean_curve(trs, T, own=False), _mean_curve(trs, T, own=True)
        curves[cond] = {"projection": raw, "own": own}
        conditions[cond] = {
            "traces": len(trs),
            "mean_projection_steered_phase": mean_of(raw[:N]),
            "mean_projection_free_phase": mean_of(raw[N:]),
            "mean_own_steered_phase": mean_of(own[:N]),
            "mean_own_free_phase": mean_of(own[N:]),
            "tokens_recorded": sum(sum(p is not None for p in tr.projection) for tr in trs),
        }
    summary: dict[str, Any] = {
        "layer": settings.layer, "layer_meaning": describe_layer(settings.layer),
        "coef": settings.coef, "steer_tokens": N, "sample_tokens": settings.sample_tokens,
        "vector_norm": vector_norm, "steering_term_projection": settings.coef * vector_norm,
        "conditions": conditions,
    }
    if UNSTEERED in curves and SWITCH in curves:
        # the decay is towards the unsteered model in the same token slots, starting from the
        # level just before the switch (the steered phase ramps up from the prompt)
        base = mean_of(curves[UNSTEERED]["projection"][N:])
        sw = curves[SWITCH]
        w = min(PRE_SWITCH_WINDOW, N)
        free = sw["own"][N:]
        levels = (mean_of(sw["projection"][N - w:N]), mean_of(sw["own"][N - w:N]), mean_of(free))
        if base is None or None in levels:  # every answer ended before a phase: nothing to compare
            summary["curves"] = curves
            summary["half_life_note"] = "not computed: answers ended early (try --suppress-eos)"
            return summary
        start_raw, start_own, free_excess = (x - base for x in levels)
        hl, own_hl = half_life(free, base, start_raw), half_life(free, base, start_own)
        summary.update({
            "unsteered_level": base,
            "pre_switch_tokens": w,
            "pre_switch_excess": start_raw,
            "pre_switch_own_excess": start_own,
            "free_phase_excess": free_excess,
            # the projection drops by the steering term at the switch: this half-life is of the
            # whole excess; the next one of what the model itself keeps along v
            "half_life_tokens": hl,
            "own_half_life_tokens": own_hl,
            "own_half_life_note": _half_life_note(own_hl, start_own, settings.sample_tokens),
            "own_retention": free_excess / start_own if start_own > 0 else None,
        })
        if STEERED in curves:
            held = mean_of(curves[STEERED]["own"][N:])
            held = None if held is None else held - base
            summary["steered_throughout_free_phase_own_excess"] = held
            summary["own_retention_vs_steered"] = free_excess / held if held and held > 0 else None
    summary["curves"] = curves
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A short plain-text table of the summary numbers."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [f"{summary['layer_meaning']}, coef {summary['coef']:g}: steering term adds "
             f"{summary['steering_term_projection']:.3f} to the projection while on",
             f"{'condition':<16} {'steered phase':>14} {'free phase':>12}   (mean (h.v)/|v|)"]
    for cond in CONDITIONS:
        c = summary["conditions"].get(cond)
        if c:
            lines.append(f"{cond:<16} {f(c['mean_projection_steered_phase']):>14} "
                         f"{f(c['mean_projection_free_phase']):>12}")
    if "unsteered_level" in summary:
        hl = summary["half_life_tokens"]
        lines += [
            f"unsteered level in the free phase {f(summary['unsteered_level'])}; excess over it in the "
            f"last {summary['pre_switch_tokens']} steered tokens {f(summary['pre_switch_excess'])} "
            f"(own, steering term removed: {f(summary['pre_switch_own_excess'])}); "
            f"free-phase excess {f(summary['free_phase_excess'])}",
            f"half-life after the switch: whole excess "
            f"{'not reached within ' + str(summary['sample_tokens']) + ' tokens' if hl is None else str(hl) + ' tokens'}"
            f"; own excess {summary['own_half_life_note']}",
            f"own retention in the free phase {f(summary['own_retention'])} of the pre-switch level"
            + (f", {f(summary['own_retention_vs_steered'])} of the steered-throughout level"
               if "own_retention_vs_steered" in summary else ""),
        ]
    return "\n".join(lines)
