"""bakery.io.folders: the one overwrite rule and atomic output folders and files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from bakery.errors import BakeryError
from bakery.io.folders import (EXPORT, PERSIST, SWEEP, VECTOR, OutputError, OutputExists, atomic_files,
                               atomic_folder, check_output)
from bakery.vectors.artifact import VectorArtifact


def _export(folder: Path, content: str = "1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bakery.json").write_text("{}")
    (folder / "weights").write_text(content)
    return folder


def test_refusals_are_bad_input_and_file_exists_errors():
    assert issubclass(OutputExists, BakeryError) and issubclass(OutputExists, FileExistsError)
    assert issubclass(OutputError, BakeryError) and issubclass(OutputError, ValueError)


def test_atomic_folder_keeps_nothing_on_error_and_replaces_only_with_force(tmp_path):
    out = tmp_path / "exp"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out, kind=EXPORT) as tmp:
            (tmp / "half.safetensors").write_bytes(b"123")
            raise KeyboardInterrupt
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_folder(out, kind=EXPORT) as tmp:
        _export(tmp, "1")
    with pytest.raises(FileExistsError, match="--force"):
        with atomic_folder(out, kind=EXPORT):
            pass
    with pytest.raises(RuntimeError):
        with atomic_folder(out, kind=EXPORT, force=True) as tmp:
            _export(tmp, "2")
            raise RuntimeError("midway")
    assert (out / "weights").read_text() == "1"  # old export untouched
    with atomic_folder(out, kind=EXPORT, force=True) as tmp:
        _export(tmp, "2")
        (tmp / "new").write_text("")
    assert sorted(p.name for p in out.iterdir()) == ["bakery.json", "new", "weights"]
    assert (out / "weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())  # an ordinary folder, not mkdtemp's 0700


def test_atomic_folder_never_overwrites_an_output_that_appeared_meanwhile(tmp_path):
    """An output that appeared while writing is left alone unless it may be replaced (force and
    the same kind); then a failed swap puts the old one back."""
    for force in (False, True):  # without force; with force, but not an export
        out = tmp_path / f"exp-{force}"
        with pytest.raises(FileExistsError, match="kept at") as e:
            with atomic_folder(out, kind=EXPORT, force=force) as tmp:
                (tmp / "new").write_text("hours of work")
                out.mkdir()
                (out / "theirs").write_text("keep me")
        kept = Path(str(e.value).split("kept at ")[1].split(". ")[0])
        assert (out / "theirs").read_text() == "keep me" and not (out / "new").exists()
        assert (kept / "new").read_text() == "hours of work" and kept.parent == tmp_path

    out = tmp_path / "exp"
    _export(out, "theirs")  # an export: force may replace it
    real = os.replace
    calls = []

    def failing_second_replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new folder into place
            raise OSError(errno.EIO, "I/O error")
        return real(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", failing_second_replace)
        with pytest.raises(OSError, match="I/O error"):
            with atomic_folder(out, kind=EXPORT, force=True) as tmp:
                (tmp / "new").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["bakery.json", "weights"]
    assert (out / "weights").read_text() == "theirs"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp.")]  # no leftovers


def test_force_replaces_only_an_output_of_the_same_kind(tmp_path):
    src, out = tmp_path / "model", tmp_path / "mine"
    src.mkdir()
    out.mkdir()
    assert check_output(out, kind=EXPORT, source=src) == out  # an empty folder is free
    (out / "notes.txt").write_text("not an export")
    for force in (False, True):
        with pytest.raises(OutputExists, match="not a previous bakery export.*choose another -o"):
            check_output(out, kind=EXPORT, force=force, source=src)
    (out / "notes.txt").unlink()
    (out / "bakery.json").write_text("{}")
    with pytest.raises(OutputExists, match="already holds a bakery export: pass --force"):
        check_output(out, kind=EXPORT, source=src)
    assert check_output(out, kind=EXPORT, source=src, force=True) == out
    # an export is not a sweep or a persist output, and those hold nothing but their own files
    for kind in (SWEEP, PERSIST):
        with pytest.raises(OutputExists, match=f"not a previous {kind.name}"):
            check_output(out, kind=kind, force=True)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")
    assert check_output(tmp_path / "s", kind=SWEEP, force=True) == tmp_path / "s"
    (tmp_path / "s" / "notes.txt").write_text("")
    with pytest.raises(OutputExists, match="not a sweep's: notes.txt"):
        check_output(tmp_path / "s", kind=SWEEP, force=True)
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputExists, match="not a folder"):
        check_output(tmp_path / "afile", kind=EXPORT, force=True)


def test_links_are_never_replaced(tmp_path):
    real = _export(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OutputExists, match="it is a link"):
        check_output(tmp_path / "link", kind=EXPORT, force=True)


def test_the_source_is_never_the_output(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for out in (src / "export", src, tmp_path):  # inside, the same, a parent (would delete it)
        with pytest.raises(OutputError, match="never writes into"):
            check_output(out, kind=EXPORT, force=True, source=src)


def test_atomic_files_write_all_or_nothing_under_the_rule(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    vec = VectorArtifact(torch.ones(3, 4))
    with atomic_files({a: VECTOR, b: VECTOR}) as tmps:
        assert set(tmps) == {a, b} and all(t.parent == tmp_path for t in tmps.values())
        for t in tmps.values():
            vec.save(t)
    assert a.is_file() and b.is_file()
    assert (a.stat().st_mode & 0o777) == (0o666 & ~_umask())
    with pytest.raises(OutputExists, match="already holds a vector file: pass --force"):
        with atomic_files({a: VECTOR}):
            pytest.fail("ran although the output exists")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_files({a: VECTOR, b: VECTOR}, force=True) as tmps:
            VectorArtifact(torch.zeros(3, 4)).save(tmps[a])
            raise RuntimeError("midway")
    assert torch.equal(_load(a), vec.vectors)  # untouched
    b.write_text("my notes")
    with pytest.raises(OutputExists, match="not a previous vector file"):
        with atomic_files({a: VECTOR, b: VECTOR}, force=True):
            pytest.fail("ran although b is not a vector")
    assert b.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temp files


def _load(path):
    from bakery.vectors.load import load_vector

    return load_vector(path).vectors


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_compare_folder_inside_an_export_is_replaced_after_a_verify(tmp_path):
    """``bakery verify`` may write compare/verify.json before ``bakery compare`` runs."""
    from bakery.io.folders import COMPARE

    final = _export(tmp_path / "exp") / "compare"
    final.mkdir()
    (final / "verify.json").write_text("{}")
    with atomic_folder(final, kind=COMPARE, force=True) as tmp:
        (tmp / "report.json").write_text("{}")
    assert (final / "report.json").is_file()
