import pytest
import torch
from click.testing import CliRunner

from bakery.cli import main


def test_threads_option_sets_torch_threads_and_rejects_zero(tmp_path):
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(main, ["verify", str(tmp_path), "--threads", "0"])
        assert r.exit_code == 2 and "must be at least 1" in r.output
        r = CliRunner().invoke(main, ["verify", str(tmp_path), "--engine", "transformers", "--threads", "1"])
        assert torch.get_num_threads() == 1
        assert r.exit_code == 2 and "not an exported model folder" in r.output  # after the option ran
    finally:
        torch.set_num_threads(before)


def test_every_command_is_registered():
    names = set(main.commands)
    assert {"extract", "steer", "sweep", "persist", "bake", "compare", "verify", "push", "vectors",
            "recipe"} <= names


def test_every_command_that_runs_torch_takes_threads():
    """The README tells users on a busy machine to pass --threads 1 to these."""
    for name in ("extract", "steer", "sweep", "persist", "bake", "compare", "verify"):
        r = CliRunner().invoke(main, [name, "--threads", "0"])
        assert r.exit_code == 2 and "must be at least 1" in r.output, (name, r.output)


# ---- errors that tell the truth ------------------------------------------------------------------
def _saved_vector(tmp_path):
    from bakery.vectors.artifact import VectorArtifact

    return str(VectorArtifact(torch.ones(3, 4), {"trait": "t"}).save(tmp_path / "v.safetensors"))


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["vectors", "info", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [f"error: vector file not found: {tmp_path / 'nope.safetensors'}"]


def test_an_os_error_about_a_user_path_is_bad_input(tmp_path, monkeypatch):
    def missing(*a, **k):
        open(tmp_path / "gone" / "x")  # raises FileNotFoundError with the path

    monkeypatch.setattr("bakery.cli.vectors.load_vector", missing)
    r = CliRunner().invoke(main, ["vectors", "info", _saved_vector(tmp_path)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip() == f"error: No such file or directory: {tmp_path / 'gone' / 'x'}"


@pytest.mark.parametrize("exc", [ZeroDivisionError("division by zero"), RuntimeError("a torch shape bug"),
                                 ValueError("not a BakeryError"), KeyError("meta")])
def test_an_internal_failure_is_reported_as_a_bug_with_its_traceback(tmp_path, monkeypatch, exc):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr("bakery.cli.vectors.cosine_by_layer", boom)
    path = _saved_vector(tmp_path)
    r = CliRunner().invoke(main, ["vectors", "compare", path, path])
    assert r.exit_code == 1, r.output
    assert "internal error (a bug in bakery, please report it):" in r.output
    assert "Traceback (most recent call last):" in r.output and f"{type(exc).__name__}" in r.output
    assert "in boom" in r.output and "error: " not in r.output.replace("internal error", "")


def test_bakery_debug_reraises(tmp_path, monkeypatch):
    monkeypatch.setattr("bakery.cli.vectors.cosine_by_layer", lambda *a: 1 / 0)
    monkeypatch.setenv("BAKERY_DEBUG", "1")
    path = _saved_vector(tmp_path)
    r = CliRunner().invoke(main, ["vectors", "compare", path, path])
    assert isinstance(r.exception, ZeroDivisionError) and "internal error" not in r.output
    def bad(*a, **k):
        from bakery.errors import BakeryError

        raise BakeryError("bad")

    monkeypatch.setattr("bakery.cli.vectors.load_vector", bad)
    r = CliRunner().invoke(main, ["vectors", "info", path])
    assert r.exception is not None and str(r.exception) == "bad"


def test_every_bad_input_error_class_is_a_bakery_error():
    """The error classes that mean bad input derive from the one base class."""
    import importlib

    from bakery.errors import BakeryError

    names = {
        "bakery.vectors.artifact": ["VectorError"], "bakery.extraction.extract": ["ExtractError"],
        "bakery.traits": ["RecipeError", "PromptsError"], "bakery.extraction.judge": ["JudgeError"],
        "bakery.extraction.recipe_gen": ["RecipeGenError"], "bakery.extraction.sweep": ["SweepError"],
        "bakery.extraction.cache": ["NotCached"], "bakery.fidelity.persist": ["PersistError"],
        "bakery.hub": ["PushError", "StrayFiles", "CardError", "NotPublishable"],
        "bakery.models": ["ModelNotFound"], "bakery.io.checkpoint": ["CheckpointError"],
        "bakery.io.folders": ["OutputError", "OutputExists"],
    }
    for mod, classes in names.items():
        m = importlib.import_module(mod)
        for c in classes:
            assert issubclass(getattr(m, c), BakeryError), f"{mod}.{c}"
