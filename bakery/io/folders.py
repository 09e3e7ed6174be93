"""The one overwrite rule for everything bakery writes, and atomic writes of folders and files.

The rule, for every command that writes (bake, compare, extract, vectors import/export-gguf,
sweep, persist, recipe new):

- a missing path (or an empty folder) is written;
- an existing output is never replaced unless the user passes ``--force``;
- ``--force`` replaces only an output of the same kind: a folder recognisable by its marker file
  (``bakery.json`` for an export, ``sweep.json`` for a sweep, ...), a file recognisable by its
  content (a vector artifact, a llama.cpp control vector, ...). It never replaces an unrelated
  folder or file, and nothing ever writes into or over the source model;
- the output is written to a temporary sibling and renamed into place at the end, so a failure
  (Ctrl-C included) leaves no partial output, and an output that appeared meanwhile is left alone.

:func:`check_output` applies the rule up front (before minutes of work); :func:`atomic_folder`
and :func:`atomic_files` apply it again when they move the finished output into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from bakery.errors import BakeryError


class OutputError(BakeryError):
    """An output path that bakery will not write (it overlaps the source model)."""


class OutputExists(OutputError, FileExistsError):
    """An existing output: replaced only with ``--force``, and only if it is of the same kind."""


# ---- kinds of output ----------------------------------------------------------------------
def _is_vector_file(path: Path) -> bool:
    """A safetensors file holding a ``vectors`` tensor (the header alone is read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024**2:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    return isinstance(header, dict) and "vectors" in header


def _is_control_vector(path: Path) -> bool:
    """A GGUF file whose architecture is ``controlvector`` (never a GGUF model)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
        return field is not None and bytes(field.parts[field.data[0]]).decode() == "controlvector"
    except Exception:  # anything unreadable is not a control vector bakery wrote
        return False


def _is_answers(path: Path) -> bool:
    """The answers file of an extraction: JSON lines with ``split`` and ``polarity``."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        row = json.loads(first) if first.strip() else None
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and {"split", "polarity"} <= set(row)


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _is_trait_recipe(path: Path) -> bool:
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception:  # not YAML at all
        return False
    return isinstance(data, dict) and {"pairs", "judge_rubric"} <= set(data)


@dataclass(frozen=True)
class OutputKind:
    """One kind of output and how to recognise a previous one (the only thing --force replaces)."""

    name: str  # "bakery export", in messages
    folder: bool
    marker: str | tuple[str, ...] | None = None  # folder: the file (one of the files) it holds
    only: frozenset[str] | None = None  # folder: the only names it may hold (None: anything)
    recognise: Callable[[Path], bool] | None = None  # file: is this an output of this kind?
    advice: str = "choose another -o"

    def why_not(self, path: Path) -> str | None:
        """Why the existing ``path`` is not a previous output of this kind (None when it is)."""
        if path.is_symlink():
            return "it is a link"
        if self.folder:
            if not path.is_dir():
                return "it is not a folder"
            names = sorted(p.name for p in path.iterdir())
            markers = (self.marker,) if isinstance(self.marker, str) else self.marker or ()
            if markers and not any((path / m).is_file() for m in markers):
                return f"it has no {' or '.join(markers)}"
            foreign = [n for n in names if n not in self.only or not (path / n).is_file()] if self.only else []
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                return f"it holds files that are not a {self.name}'s: {shown}"
            return None
        if not path.is_file():
            return "it is not a file"
        if self.recognise is not None and not self.recognise(path):
            return f"its content is not a {self.name}"
        return None


EXPORT = OutputKind("bakery export", folder=True, marker="bakery.json")
# compare/ inside an export: `bakery compare` writes report.json, `bakery verify` verify.json
COMPARE = OutputKind("compare report", folder=True, marker=("report.json", "verify.json"))
SWEEP = OutputKind("sweep", folder=True, marker="sweep.json", only=frozenset({"sweep.json", "sweep.png"}))
PERSIST = OutputKind("persist output", folder=True, marker="summary.json", only=frozenset(
    {"summary.json", "traces.json", "traces.csv", "texts.md", "persist.png"}))
EXTRACTION_ENTRY = OutputKind("extraction cache entry", folder=True, marker="vector.safetensors",
                              advice="remove it, it is a damaged cache entry")
VECTOR = OutputKind("vector file", folder=False, recognise=_is_vector_file)
CONTROL_VECTOR = OutputKind("llama.cpp control vector", folder=False, recognise=_is_control_vector)
ANSWERS = OutputKind("extraction answers file", folder=False, recognise=_is_answers)
PLOT = OutputKind("plot", folder=False, recognise=_is_png)
TRAIT_RECIPE = OutputKind("trait recipe", folder=False, recognise=_is_trait_recipe)
# `bakery gguf`: one .gguf plus bakery-gguf.json (its marker), README.md and Modelfile
GGUF_EXPORT = OutputKind("bakery GGUF folder", folder=True, marker="bakery-gguf.json")
# `bakery vectors import FOLDER`: one artifact per training checkpoint plus its index
CHECKPOINT_VECTORS = OutputKind("per-checkpoint vectors folder", folder=True, marker="checkpoints.json")


# ---- the rule -----------------------------------------------------------------------------
def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _is_free(path: Path) -> bool:
    """Nothing there, or an empty folder (a rename replaces it)."""
    if not os.path.lexists(path):
        return True
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def refusal(out: Path, kind: OutputKind, force: bool) -> OutputExists | None:
    """The error that forbids writing ``out`` now, or None when it may be written."""
    if _is_free(out):
        return None
    why = kind.why_not(out)
    if why is not None:
        return OutputExists(f"{out} exists and is not a previous {kind.name} ({why}); --force "
                            f"replaces only a previous {kind.name}, so {kind.advice}.")
    if not force:
        return OutputExists(f"{out} already holds a {kind.name}: pass --force to replace it, or "
                            f"{kind.advice}")
    return None


def check_output(out: str | os.PathLike, *, kind: OutputKind, force: bool = False,
                 source: str | os.PathLike | None = None) -> Path:
    """Apply the overwrite rule to ``out`` (see the module doc) and return it as a Path.

    ``source`` (the model folder a bake reads) may be neither inside ``out`` nor contain it."""
    out = Path(out)
    if source is not None and (_inside(out, Path(source)) or _inside(Path(source), out)):
        raise OutputError(
            f"output {out} overlaps the source model folder {source}: bakery never writes into (or "
            "over) the source. Choose another -o.")
    err = refusal(out, kind, force)
    if err is not None:
        raise err
    return out


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, *, kind: OutputKind, force: bool = False,
                  source: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; move it to ``out`` only if the block finishes.

    ``out`` is checked with :func:`check_output` first and again at the end. Any exception
    (Ctrl-C included) in the block removes the temporary folder, so no partial output is left. A
    previous output (with ``force``) is replaced only after the new one is complete, and put back
    if the swap fails. An ``out`` that appeared while the block ran and may not be replaced is left
    alone; the finished folder is then kept under its temporary name (named in the error).
    """
    out = check_output(out, kind=kind, force=force, source=source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; an output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _is_free(out):
        try:
            os.rename(tmp, out)  # fails if out appeared meanwhile (unless it is an empty folder)
            return
        except OSError as e:
            if _is_free(out):
                shutil.rmtree(tmp, ignore_errors=True)
                raise OutputError(f"could not move the finished output into {out}: {e}") from e
    err = refusal(out, kind, force)
    if err is not None:
        raise OutputExists(
            f"{out} appeared while bakery was writing it and was left alone; the finished output "
            f"is kept at {tmp}. Move it where you want it, or run again with --force. ({err})")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(targets: Mapping[str | os.PathLike, OutputKind], *,
                 force: bool = False) -> Iterator[dict[Path, Path]]:
    """Write several files as one output: yield ``{target: temporary sibling}``; when the block
    finishes, every target is checked again and every temporary file renamed into place.

    Each target is checked with :func:`check_output` first. On an exception, or when a target may
    not be replaced at the end, the temporary files are removed and no target is touched."""
    paths = {Path(p): k for p, k in targets.items()}
    for p, k in paths.items():
        check_output(p, kind=k, force=force)
    tmps: dict[Path, Path] = {}
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{p.name}.partial-", dir=p.parent)
            os.close(fd)
            tmps[p] = Path(name)
        yield dict(tmps)
        for p, k in paths.items():
            if not tmps[p].is_file():
                raise RuntimeError(f"internal error: nothing was written for {p}")
            err = refusal(p, k, force)
            if err is not None:
                raise OutputExists(f"{p} appeared while bakery was writing it and was left alone; "
                                   f"nothing was written. ({err})")
        for p, tmp in tmps.items():
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; outputs are ordinary files
            os.replace(tmp, p)
    finally:
        for tmp in tmps.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)
