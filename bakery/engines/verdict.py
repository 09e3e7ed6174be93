"""An engine check's result: :class:`Verdict` (pass, fail, not run, and what was actually run),
and the error for an engine that is not installed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bakery.errors import BakeryError

RULES_ONLY = "rules only (not run)"
KINDS = ("run", "rules", "not-installed", "not-applicable")


class EngineNotInstalled(BakeryError):
    """An engine bakery cannot find; the message says how to install it."""


@dataclass
class Verdict:
    """One engine's verdict on one export.

    ``kind``: ``run`` (the engine loaded and ran the export), ``rules`` (read from the engine's
    loading rules, nothing ran: sglang when it is not installed) or ``not-installed``. ``status``:
    ``pass`` or ``fail`` for a run; for rules, ``fail`` when the rules find the edit is lost, else
    ``not-run`` (a clean rule check is neither a pass nor a fail); ``not-run`` when not installed."""

    engine: str
    status: str  # pass | fail | not-run
    message: str
    launch_flag: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    kind: str = "run"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"verdict kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind != "run" and self.status == "pass":
            raise ValueError(f"a {self.kind} verdict cannot pass: nothing ran")

    @property
    def ran(self) -> bool:
        return self.kind == "run"

    @property
    def passed(self) -> bool:
        """A real run that passed: the only verdict that counts as a pass."""
        return self.ran and self.status == "pass"

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    ok = passed  # older name

    @property
    def label(self) -> str:
        """The verdict as printed everywhere (terminal, markdown, JSON)."""
        if self.kind == "rules":
            return f"✘ FAIL, {RULES_ONLY}" if self.failed else f"– {RULES_ONLY}"
        if self.kind == "not-installed":
            return "– not installed (not run)"
        if self.kind == "not-applicable":
            return "– not applicable (not run)"
        return "✔ pass" if self.passed else "✘ FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "status": self.status, "kind": self.kind, "ran": self.ran,
                "ok": self.passed, "label": self.label, "message": self.message,
                "launch_flag": self.launch_flag, "details": self.details}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Verdict":
        """From :meth:`to_dict`, or from a ``verify.json`` written before verdicts had a kind (an
        sglang verdict there was a rules-only one, whatever its status said)."""
        kind, status = d.get("kind"), d.get("status", "fail")
        if kind is None:
            kind = "not-installed" if status == "not-installed" else "rules" if d.get("engine") == "sglang" else "run"
        if kind != "run" and status != "fail":
            status = "not-run"
        return cls(d["engine"], status, d.get("message", ""), d.get("launch_flag"), d.get("details") or {}, kind)
