import pytest
import torch
from click.testing import CliRunner

from bakery.cli import main
from bakery.vectors.artifact import VectorArtifact


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_bad_vector_and_layer_are_named(tiny_models, tmp_path):
    d = tiny_models("llama")
    wrong = VectorArtifact(torch.randn(5, 48)).save(tmp_path / "wrong.safetensors")
    r = _run("steer", "-v", wrong, "-l", 2, "-c", 1, "--model", d, "hi")
    assert r.exit_code == 2 and "hidden size 48" in r.output and "hidden size 32" in r.output
    ok = VectorArtifact(torch.randn(5, 32)).save(tmp_path / "ok.safetensors")
    r = _run("steer", "-v", ok, "-l", 7, "-c", 1, "--model", d, "hi")
    assert r.exit_code == 2 and "layer 7 is out of range" in r.output
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x00" * 20)
    r = _run("steer", "-v", corrupt, "-l", 2, "-c", 1, "--model", d, "hi")
    assert r.exit_code == 2 and "corrupt" in r.output


def test_steer_prints_both_columns_on_a_tiny_model(tiny_models, tmp_path):
    d = tiny_models("llama")
    v = VectorArtifact(torch.randn(5, 32) * 10).save(tmp_path / "v.safetensors")
    r = _run("steer", "-v", v, "-l", 2, "-c", 4, "--model", d, "--max-new-tokens", 8, "hello sea")
    assert r.exit_code == 0, r.output
    assert "layer 2 = output of block 1" in r.output and "| steered (coef 4)" in r.output




@pytest.mark.slow
def test_steer_on_the_embedded_model_changes_the_answer(smol_dir, smol_pirate, tmp_path):
    v = smol_pirate.save(tmp_path / "pirate.safetensors")
    r = _run("steer", "-v", v, "-l", 16, "-c", 1.5, "--max-new-tokens", 24, "How do I cook rice?")
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if " | " in line][2:]
    left = " ".join(line.split(" | ")[0].strip() for line in rows)
    right = " ".join(line.split(" | ")[1].strip() for line in rows)
    assert left and right and left != right


def test_vector_or_trait_exactly_one(tiny_models, tmp_path):
    d = tiny_models("llama")
    r = _run("steer", "-l", 2, "-c", 1, "--model", d, "hi")
    assert r.exit_code == 2 and "exactly one of --vector FILE or --trait NAME" in r.output
    r = _run("steer", "--trait", "nonesuch", "-l", 2, "-c", 1, "--model", d, "hi")
    assert r.exit_code == 2 and "no cached vector for trait 'nonesuch'" in r.output
