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
