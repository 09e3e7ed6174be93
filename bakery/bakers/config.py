"""The typed config every baker declares, and what is derived from it.

A baker's options are one dataclass whose fields carry their command-line form in the field
metadata (:func:`option`). From that one declaration come the ``bakery bake`` flags, the refusal of
an option the method does not take, the ``options`` section of ``bake.yaml`` and the manifest, the
settings table of the model card, and the reproduce command. A field whose value is ``None``
was not given; the baker resolves its default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import yaml

from bakery.bakers.errors import BakeError


_NO_VALUE = object()


def option(default: Any = None, help: str = "", *, flag: str | None = None, choices: tuple | None = None,
           kind: type | None = None, requires: dict[str, Any] | None = None, is_flag: bool = False,
           unset: Any = _NO_VALUE):
    """A config field. ``flag``: its ``bakery bake`` flag (else it is set with ``--set KEY=VALUE``);
    ``requires``: other fields' values it is only meaningful with (``{"route": "rank1"}``);
    ``unset``: the value the method uses when the option is not given (:meth:`BakerConfig.resolved`),
    said in the help as ``(default ...)``."""
    if unset is not _NO_VALUE:
        help = f"{help} (default {setting_text(unset) if unset not in ([], None) else 'none'})"
    meta = {"help": help, "flag": flag, "choices": choices, "kind": kind, "requires": requires or {},
            "is_flag": is_flag, "unset": unset}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def fmt_float(x: float) -> str:
    """A float for a command line: short (``3``, ``0.01``) but exact, so it reads back the same."""
    x = float(x)
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def setting_text(v: Any) -> str:
    """A value as ``--set KEY=VALUE`` reads it back (a YAML scalar, or a JSON list)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return fmt_float(v)
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    s = str(v)
    if isinstance(v, int):
        return s
    try:
        plain = yaml.safe_load(s) == s
    except yaml.YAMLError:
        plain = False
    return s if plain else json.dumps(s)


@dataclass
class BakerConfig:
    """Base of every baker's config. Subclasses add fields made with :func:`option`."""

    method: ClassVar[str] = ""

    @classmethod
    def options(cls) -> Iterator[dataclasses.Field]:
        yield from dataclasses.fields(cls)

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, options: dict[str, Any], *, others: dict[str, type["BakerConfig"]] | None = None,
                     how: str = "option") -> "BakerConfig":
        """The config from ``{name: value}``; a name this method does not take is an error that
        names the methods that do (``others``: every registered method's config)."""
        unknown = [k for k, v in options.items() if v is not None and k not in cls.option_names()]
        if unknown:
            raise BakeError("; ".join(unknown_option_message(k, cls.method, others or {}, how)
                                      for k in sorted(unknown)))
        cfg = cls(**{k: v for k, v in options.items() if v is not None})
        cfg.check()
        return cfg

    def check(self) -> None:
        """Types, choices and ``requires``; subclasses add their own rules."""
        for f in self.options():
            v = getattr(self, f.name)
            if v is None:
                continue
            m = f.metadata
            kind = m.get("kind")
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
                setattr(self, f.name, v)
            if kind is not None and not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise BakeError(f"{describe(f)} must be {kind.__name__}; got {v!r}")
            if m.get("choices") and v not in m["choices"]:
                raise BakeError(f"{describe(f)} must be one of {', '.join(map(str, m['choices']))}; got {v!r}")
            for other, needed in m.get("requires", {}).items():
                if getattr(self, other) != needed:
                    raise BakeError(f"{describe(f)} is for --method {self.method} "
                                    f"{describe(self.field(other))} {needed}; it does nothing otherwise")

    @classmethod
    def field(cls, name: str) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(cls) if f.name == name)

    def resolved(self):
        """A copy with every option that was not given at the value the method then uses (its
        ``unset``); options whose default depends on the run stay ``None``."""
        values = {f.name: f.metadata["unset"] for f in self.options()
                  if getattr(self, f.name) is None and f.metadata.get("unset", _NO_VALUE) is not _NO_VALUE}
        return dataclasses.replace(self, **{k: (list(v) if isinstance(v, list) else v) for k, v in values.items()})

    def given(self) -> dict[str, Any]:
        """The options that were set (not ``None``), in declaration order: bake.yaml's section."""
        return {f.name: getattr(self, f.name) for f in self.options() if getattr(self, f.name) is not None}

    def reproduce_args(self) -> list[str]:
        """The flags (or ``--set`` items) that set this config again."""
        args: list[str] = []
        for name, v in self.given().items():
            f = self.field(name)
            flag = f.metadata.get("flag")
            if flag and f.metadata.get("is_flag"):
                args += [flag] if v else []
            elif flag:
                args += [flag, fmt_float(v) if isinstance(v, float) else str(v)]
            else:
                args += ["--set", f"{name}={setting_text(v)}"]
        return args

    def card_rows(self) -> list[tuple[str, str]]:
        """(setting, value) for the card: every option, ``default`` where it was not given."""
        return [(f.name, "default" if getattr(self, f.name) is None else str(getattr(self, f.name)))
                for f in self.options()]


def describe(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f"--set {f.name}"


def unknown_option_message(name: str, method: str, others: dict[str, type[BakerConfig]], how: str) -> str:
    takers = [m for m, c in others.items() if name in c.option_names()]
    shown = name
    for c in others.values():
        if name in c.option_names():
            f = c.field(name)
            shown = f.metadata.get("flag") or f"--set {name}" if how == "option" else name
            break
    if takers:
        return f"{shown} is for --method {' / '.join(takers)}; --method {method} does not take it"
    allowed = sorted(others[method].option_names()) if method in others else []
    return f"unknown {how} '{name}' for --method {method} (it takes: {', '.join(allowed) or 'none'})"
