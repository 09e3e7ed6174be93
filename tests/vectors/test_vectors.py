"""The vector artifact: its files, layer rules, imports (.pt, single directions, GGUF) and exports."""
import json

import pytest
import torch
from click.testing import CliRunner

from bakery.cli import main
from bakery.steering.hooks import steer
from bakery.vectors.artifact import VectorArtifact, VectorError, cosine_by_layer
from bakery.vectors.load import load_vector


@torch.no_grad()
def _steered_alike(model, ids, full, one, layer: int, coef: float):
    """Logits of ``model`` steered by the full table and by the single direction imported from
    it, and unsteered."""
    base = model(ids).logits
    with steer(model, full, layer, coef=coef):
        a = model(ids).logits
    with steer(model, one, layer, coef=coef):
        b = model(ids).logits
    return a, b, base


def _art(n=4, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return VectorArtifact(torch.randn(n + 1, h, generator=g),
                          {"trait": "pirate", "model": "tiny", "auc": [0.5, 0.61, 0.72, 0.93, 0.8]})


def test_safetensors_round_trip_keeps_tensor_and_metadata(tmp_path):
    a = _art()
    p = a.save(tmp_path / "v" / "pirate.safetensors")
    b = load_vector(p)
    assert torch.equal(a.vectors, b.vectors)
    assert b.meta["trait"] == "pirate" and b.meta["model"] == "tiny"
    assert len(b.meta["per_layer_norm"]) == 5
    assert b.sha256() == a.sha256()


def test_reference_pt_imports_as_is(tmp_path):
    t = torch.randn(5, 32)
    torch.save(t, tmp_path / "evil_response_avg_diff.pt")
    art = load_vector(tmp_path / "evil_response_avg_diff.pt")
    assert torch.equal(art.vectors, t)
    assert art.trait == "evil_response_avg_diff"


def test_pt_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"vectors": Evil()}, tmp_path / "bad.pt")
    with pytest.raises(VectorError, match="weights_only=True"):
        load_vector(tmp_path / "bad.pt")


def test_control_vector_gguf_mapping_is_pinned(tmp_path):
    """llama.cpp's direction.N is added to the output of block N (0-based) = artifact row N+1."""
    import gguf

    a = _art(n=6)
    path = a.to_control_vector(tmp_path / "cv.gguf")
    reader = gguf.GGUFReader(str(path))
    names = sorted(t.name for t in reader.tensors)
    assert names == [f"direction.{i}" for i in range(1, 5)]  # rows 2..5; no direction.0 in llama.cpp
    d3 = next(t for t in reader.tensors if t.name == "direction.3")
    assert torch.allclose(torch.tensor(d3.data.copy()).flatten(), a.vectors[4])
    assert reader.fields["general.architecture"].contents() == "controlvector"

    back = load_vector(path, num_layers=6)
    assert torch.equal(back.vectors[2:6], a.vectors[2:6])
    assert back.vectors[0].abs().sum() == 0 and back.vectors[1].abs().sum() == 0  # not representable
    assert back.vectors[6].abs().sum() == 0  # never lands on the post-norm row


def test_control_vector_written_by_hand_imports_by_block_name(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.2", np.full(8, 3.0, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    art = load_vector(tmp_path / "x.gguf", num_layers=5)
    assert art.vectors.shape == (6, 8)
    assert torch.all(art.vectors[3] == 3.0) and art.vectors.abs().sum() == 24.0


def test_corrupt_and_foreign_files_get_clear_errors(tmp_path):
    p = tmp_path / "broken.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00not a header at all")
    with pytest.raises(VectorError, match="corrupt"):
        load_vector(p)
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(VectorError, match="no 'vectors' tensor"):
        load_vector(tmp_path / "other.safetensors")
    with pytest.raises(VectorError, match="not found"):
        load_vector(tmp_path / "missing.safetensors")
    (tmp_path / "v.npy").write_bytes(b"x")
    with pytest.raises(VectorError, match="unknown vector file type"):
        load_vector(tmp_path / "v.npy")


def test_check_model_names_both_sizes_and_layer_rules():
    a = _art(n=4, h=32)
    with pytest.raises(VectorError, match=r"hidden size 32 .* hidden size 64"):
        a.check_model({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4})
    with pytest.raises(VectorError, match="needs 7 rows"):
        a.check_model({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 6})
    a.check_model({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 4})
    with pytest.raises(VectorError, match="after the final norm"):
        a.check_layer(4, for_bake=True)
    a.check_layer(4)  # steering the last row is allowed
    for bad in (0, 5, -1):
        with pytest.raises(VectorError, match="out of range"):
            a.check_layer(bad)
    a.check_layer(3, for_bake=True)


def test_nan_and_wrong_rank_are_refused():
    with pytest.raises(VectorError, match="NaN"):
        VectorArtifact(torch.full((3, 4), float("nan")))
    with pytest.raises(VectorError, match="2-D"):
        VectorArtifact(torch.zeros(4))


def test_cosine_by_layer():
    a = _art()
    b = VectorArtifact(torch.cat([a.vectors[:2], -a.vectors[2:]]))
    cos = cosine_by_layer(a, b)
    assert cos[:2] == pytest.approx([1, 1], abs=1e-6) and cos[2:] == pytest.approx([-1] * 3, abs=1e-6)


def test_cli_info_and_compare(tmp_path):
    a, b = _art(seed=0), _art(seed=1)
    pa, pb = a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")
    r = CliRunner().invoke(main, ["vectors", "info", str(pa)])
    assert r.exit_code == 0, r.output
    assert "layer 2 = output of block 1" in r.output and "trait: pirate" in r.output
    row3 = next(line for line in r.output.splitlines() if line.strip().startswith("3 "))
    assert f"{a.norms()[3]:.4f}" in row3 and "0.930" in row3
    r = CliRunner().invoke(main, ["vectors", "compare", str(pa), str(pa)])
    assert r.exit_code == 0 and "mean cosine over rows 1..3: 1.0000" in r.output
    r = CliRunner().invoke(main, ["vectors", "compare", str(pa), str(pb)])
    assert "1.0000" not in r.output.splitlines()[-1]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    r = CliRunner().invoke(main, ["vectors", "info", str(bad)])
    assert r.exit_code == 2 and "corrupt" in r.output


def test_cli_import_and_export_never_replace_a_file_without_force(tmp_path):
    """The one overwrite rule: OUT is replaced only with --force, and only if it is a file of the
    same kind (a vector artifact; a llama.cpp control vector), never another file."""
    art = _art()
    ref = tmp_path / "pirate.pt"
    torch.save(art.vectors.clone(), ref)
    out = tmp_path / "pirate.safetensors"
    r = CliRunner().invoke(main, ["vectors", "import", str(ref), str(out)])
    assert r.exit_code == 0, r.output
    before = out.read_bytes()
    r = CliRunner().invoke(main, ["vectors", "import", str(ref), str(out), "--trait", "other"])
    assert r.exit_code == 2 and "already holds a vector file: pass --force" in r.output
    assert "Traceback" not in r.output and out.read_bytes() == before
    r = CliRunner().invoke(main, ["vectors", "import", str(ref), str(out), "--trait", "other", "--force"])
    assert r.exit_code == 0, r.output
    assert load_vector(out).trait == "other"
    notes = tmp_path / "notes.safetensors"
    notes.write_text("mine")
    r = CliRunner().invoke(main, ["vectors", "import", str(ref), str(notes), "--force"])
    assert r.exit_code == 2 and "is not a previous vector file" in r.output and notes.read_text() == "mine"

    gg = tmp_path / "pirate.gguf"
    assert CliRunner().invoke(main, ["vectors", "export-gguf", str(out), str(gg)]).exit_code == 0
    r = CliRunner().invoke(main, ["vectors", "export-gguf", str(out), str(gg)])
    assert r.exit_code == 2 and "--force" in r.output
    assert CliRunner().invoke(main, ["vectors", "export-gguf", str(out), str(gg), "--force"]).exit_code == 0
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)  # e.g. a llama.cpp model: never replaced by a control vector
    r = CliRunner().invoke(main, ["vectors", "export-gguf", str(out), str(model), "--force"])
    assert r.exit_code == 2 and "not a previous llama.cpp control vector" in r.output
    assert model.read_bytes() == b"GGUF" + b"\0" * 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "notes.safetensors", "pirate.gguf",
                                                          "pirate.pt", "pirate.safetensors"]


def test_saved_artifact_is_world_readable(tmp_path):
    import stat

    p = _art().save(tmp_path / "a.safetensors")
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_bake_sizes_a_llama_cpp_control_vector_by_the_model(tiny_models, tmp_path):
    """llama.cpp's cvector-generator writes direction.1 .. direction.{n-1} with layer_count n-1:
    read alone, the file suggests n+1 layers; bake reads it with the model's depth instead."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from bakery.bakers import bake
    from bakery.models import read_config

    src = tiny_models("llama")
    n, hidden = read_config(src)["num_hidden_layers"], read_config(src)["hidden_size"]
    w = gguf.GGUFWriter(str(tmp_path / "cv.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", n - 1)
    g = torch.Generator().manual_seed(3)
    for block in range(1, n):
        w.add_tensor(f"direction.{block}", torch.randn(hidden, generator=g).numpy().astype(np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    assert load_vector(tmp_path / "cv.gguf").num_layers == n + 1  # what the file alone suggests

    out = bake("bias", src, [(tmp_path / "cv.gguf", 2, 1.5)], tmp_path / "out", progress=False)
    want = load_vector(tmp_path / "cv.gguf", num_layers=n).vectors[2] * 1.5  # direction.1 = row 2
    bias = load_file(out / "model.safetensors")["model.layers.1.mlp.down_proj.bias"].float()
    assert torch.allclose(bias, want, atol=1e-6) and want.abs().sum() > 0


# ---- what write-ups and reference code publish: single directions, per-checkpoint folders -----------

def _import(*args):
    return CliRunner().invoke(main, ["vectors", "import", *map(str, args)])


def test_single_direction_steers_exactly_like_the_same_row_of_a_full_table(tiny_models, tmp_path):
    """A [hidden] direction imported with --layer L and --model gives a table whose row L is the
    direction and every other row zero; steering with it equals steering with the full table."""
    from bakery.models import load_model

    d = tiny_models("llama")
    g = torch.Generator().manual_seed(7)
    table = torch.randn(5, 32, generator=g) * 3
    torch.save(table, tmp_path / "full.pt")
    torch.save(table[2].clone(), tmp_path / "persona_dir.pt")
    r = _import(tmp_path / "full.pt", tmp_path / "full.safetensors")
    assert r.exit_code == 0, r.output
    r = _import(tmp_path / "persona_dir.pt", tmp_path / "dir.safetensors", "--model", d, "--layer", 2)
    assert r.exit_code == 0, r.output
    assert "layer 2 = output of block 1" in r.output
    full, one = load_vector(tmp_path / "full.safetensors"), load_vector(tmp_path / "dir.safetensors")
    assert one.vectors.shape == full.vectors.shape == (5, 32)
    assert torch.equal(one.vectors[2], full.vectors[2])
    assert one.vectors[[0, 1, 3, 4]].abs().sum() == 0
    assert one.meta["single_direction"] is True and one.meta["recommended_layer"] == 2
    assert one.meta["import"]["layout"] == "single direction" and one.meta["num_hidden_layers"] == 4
    assert one.meta["source"]["file"] == "persona_dir.pt" and len(one.meta["source"]["sha256"]) == 64
    one.check_model({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 4})

    a, b, base = _steered_alike(load_model(d), torch.tensor([[1, 5, 9, 13, 17, 21]]), full, one, 2, 1.5)
    assert torch.equal(a, b)
    assert (a - base).abs().max() > 1e-3  # the steering did something


@pytest.mark.parametrize("variant", ["bf16", "row", "wrapped"])
def test_single_direction_forms(tiny_models, tmp_path, variant):
    from bakery.vectors.imports import import_pt

    from bakery.models import read_config

    v = torch.randn(32)
    obj = {"bf16": v.bfloat16(), "row": v[None], "wrapped": {"direction": v}}[variant]
    torch.save(obj, tmp_path / "d.pt")
    art = import_pt(tmp_path / "d.pt", config=read_config(tiny_models("llama")), layer=3)
    want = v.bfloat16().float() if variant == "bf16" else v
    assert torch.equal(art.vectors[3], want) and art.vectors.dtype == torch.float32


def test_single_direction_refusals(tiny_models, tmp_path):
    d = tiny_models("llama")
    torch.save(torch.randn(32), tmp_path / "dir.pt")
    out = tmp_path / "o.safetensors"
    cases = [
        ((), "say which model it belongs to with --model"),
        (("--model", d), "does not say its layer: pass --layer L"),
        (("--model", d, "--layer", 4), "layer 4 is the last row, taken after the final norm"),
        (("--model", d, "--layer", 0), "layer 0 is out of range for a model with 4 layers"),
        (("--model", d, "--layer", 9), "layer 9 is out of range for a model with 4 layers: choose a layer in 1..3"),
    ]
    for extra, message in cases:
        r = _import(tmp_path / "dir.pt", out, *extra)
        assert r.exit_code == 2 and message in r.output, (extra, r.output)
        assert "Traceback" not in r.output
    torch.save(torch.randn(16), tmp_path / "small.pt")
    r = _import(tmp_path / "small.pt", out, "--model", d, "--layer", 2)
    assert r.exit_code == 2 and "hidden size 16 but the model" in r.output and "hidden size 32" in r.output
    torch.save(torch.randn(5, 32), tmp_path / "full.pt")
    r = _import(tmp_path / "full.pt", out, "--model", d, "--layer", 2)
    assert r.exit_code == 2 and "--layer only places a single [hidden] direction" in r.output
    torch.save(torch.randn(7, 32), tmp_path / "deeper.pt")
    r = _import(tmp_path / "deeper.pt", out, "--model", d)
    assert r.exit_code == 2 and "needs 5 rows" in r.output
    assert not out.exists()
    # every command that reads .pt directly says how to import a single direction
    with pytest.raises(VectorError, match=r"single direction of shape \[32\].*vectors import .*--layer L"):
        load_vector(tmp_path / "dir.pt")


def test_pt_layouts_outside_the_documented_ones_are_refused(tmp_path):
    from bakery.vectors.pt import PtLayoutError

    bad = {
        "list": [torch.zeros(4)],
        "rank3": torch.zeros(2, 3, 4),
        "mixed": {"layer_1": torch.zeros(4), "evil": torch.zeros(5, 4)},
        "nontensor": {"vectors": torch.zeros(5, 4), "note": "x"},
        "named": {"evil": torch.zeros(5, 4), "pirate": torch.zeros(5, 4)},
        "empty": {},
    }
    messages = {"list": "holds list", "rank3": r"shape \(2, 3, 4\)", "mixed": "mixes layer numbers",
                "nontensor": "must be the only one", "named": "several named tensors", "empty": "empty dict"}
    for name, obj in bad.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(PtLayoutError, match=messages[name]):
            load_vector(tmp_path / f"{name}.pt")
    assert issubclass(PtLayoutError, VectorError)


def test_per_layer_dict_imports_with_the_model(tiny_models, tmp_path):
    from bakery.models import read_config
    from bakery.vectors.imports import import_pt

    rows = {"layer_1": torch.randn(32), 3: torch.randn(32)}
    torch.save(rows, tmp_path / "rows.pt")
    art = import_pt(tmp_path / "rows.pt", config=read_config(tiny_models("llama")))
    assert torch.equal(art.vectors[1], rows["layer_1"]) and torch.equal(art.vectors[3], rows[3])
    assert art.vectors[[0, 2, 4]].abs().sum() == 0 and art.meta["import"]["layers_set"] == [1, 3]
    with pytest.raises(VectorError, match="layers \\[1, 3\\] only.*--model MODEL"):
        load_vector(tmp_path / "rows.pt")


def _checkpoint_folder(tmp_path, shape=(5, 32)):
    src = tmp_path / "olmo-trace"
    src.mkdir()
    g = torch.Generator().manual_seed(11)
    tables = {name: torch.randn(*shape, generator=g) for name in
              ("step1000", "step250", "stage1-step20000-tokens42B")}
    for name, t in tables.items():
        torch.save(t, src / f"{name}.pt")
    (src / "README.txt").write_text("how these were made")
    return src, tables


def test_per_checkpoint_folder_round_trip(tiny_models, tmp_path):
    from bakery.vectors.imports import INDEX, load_checkpoint_folder

    src, tables = _checkpoint_folder(tmp_path)
    out = tmp_path / "trace-vectors"
    r = _import(src, out, "--model", tiny_models("llama"), "--trait", "evil")
    assert r.exit_code == 0, r.output
    assert "3 checkpoint vector(s)" in r.output and "ignored (not .pt): README.txt" in r.output
    back = load_checkpoint_folder(out)
    assert list(back) == ["step250", "step1000", "stage1-step20000-tokens42B"]  # by step
    for name, art in back.items():
        assert torch.equal(art.vectors, tables[name])
        assert art.meta["checkpoint"] == art.meta["revision"] == name and art.meta["trait"] == "evil"
        assert art.meta["imported_from"] == "per-checkpoint .pt folder" and art.meta["model_type"] == "llama"
    assert back["stage1-step20000-tokens42B"].meta["step"] == 20000
    index = json.loads((out / INDEX).read_text())
    assert index["ignored"] == ["README.txt"] and [c["step"] for c in index["checkpoints"]] == [250, 1000, 20000]
    assert index["checkpoints"][0]["sha256"] == back["step250"].sha256()
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX] + [f"{n}.safetensors" for n in tables])
    # the overwrite rule: a previous import is replaced only with --force, another folder never
    before = (out / INDEX).read_bytes()
    r = _import(src, out)
    assert r.exit_code == 2 and "pass --force" in r.output and (out / INDEX).read_bytes() == before
    assert _import(src, out, "--force").exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("x")
    r = _import(src, mine, "--force")
    assert r.exit_code == 2 and "not a previous per-checkpoint vectors folder" in r.output


def test_per_checkpoint_folder_of_named_entries_and_directions(tiny_models, tmp_path):
    from bakery.models import read_config
    from bakery.vectors.imports import read_checkpoint_folder

    src = tmp_path / "runs"
    src.mkdir()
    t = {k: torch.randn(5, 32) for k in ("evil", "sycophantic")}
    torch.save(t, src / "step100.pt")
    torch.save({"evil": torch.zeros(5, 32), "sycophantic": torch.ones(5, 32)}, src / "step200.pt")
    arts = read_checkpoint_folder(src)
    assert list(arts) == ["step100.evil", "step100.sycophantic", "step200.evil", "step200.sycophantic"]
    assert torch.equal(arts["step100.evil"].vectors, t["evil"]) and arts["step100.evil"].trait == "evil"
    assert arts["step200.sycophantic"].meta["entry"] == "sycophantic"

    dirs = tmp_path / "dirs"
    dirs.mkdir()
    for step in (1, 2):
        torch.save(torch.full((32,), float(step)), dirs / f"step{step}.pt")
    cfg = read_config(tiny_models("llama"))
    arts = read_checkpoint_folder(dirs, config=cfg, layer=2)
    assert arts["step2"].vectors[2].eq(2).all() and arts["step2"].vectors.abs().sum() == 64
    with pytest.raises(VectorError, match="pass --layer L"):
        read_checkpoint_folder(dirs, config=cfg)


def test_per_checkpoint_folder_refusals(tmp_path):
    from bakery.vectors.imports import read_checkpoint_folder

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(VectorError, match="holds no .pt files"):
        read_checkpoint_folder(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    torch.save(torch.zeros(5, 32), mixed / "step1.pt")
    torch.save(torch.zeros(7, 32), mixed / "step2.pt")
    with pytest.raises(VectorError, match=r"step2.pt has shape \(7, 32\) but step1 has \(5, 32\)"):
        read_checkpoint_folder(mixed)
    nested = tmp_path / "nested"
    (nested / "olmo").mkdir(parents=True)
    torch.save(torch.zeros(5, 32), nested / "olmo" / "step1.pt")
    with pytest.raises(VectorError, match="subfolder olmo/"):
        read_checkpoint_folder(nested)
    with pytest.raises(VectorError, match="is not a folder"):
        read_checkpoint_folder(tmp_path / "missing")
    odd = tmp_path / "odd"
    odd.mkdir()
    torch.save({"a b": torch.zeros(5, 32)}, odd / "step1.pt")
    with pytest.raises(VectorError, match="cannot name a file"):
        read_checkpoint_folder(odd)


def test_control_vector_import_takes_its_depth_from_model(tiny_models, tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "cv.gguf"), "controlvector")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.1", np.full(32, 2.0, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    r = _import(tmp_path / "cv.gguf", tmp_path / "cv.safetensors", "--model", tiny_models("llama"))
    assert r.exit_code == 0, r.output
    art = load_vector(tmp_path / "cv.safetensors")
    assert art.vectors.shape == (5, 32) and torch.all(art.vectors[2] == 2.0)
    assert art.meta["model_type"] == "llama" and art.meta["imported_from"] == "llama.cpp control vector"


def test_single_direction_for_a_multimodal_wrapper_is_sized_by_its_text_tower(tmp_path):
    """The Qwen3.5 write-up's model is a Qwen3_5ForConditionalGeneration: its sizes live under
    text_config, and the direction is placed by those."""
    from tiny import make_tiny_multimodal

    d = make_tiny_multimodal("qwen3_5", tmp_path / "qwen3_5")
    n = json.loads((d / "config.json").read_text())["text_config"]["num_hidden_layers"]
    v = torch.randn(32)
    torch.save(v, tmp_path / "persona_dir.pt")
    r = _import(tmp_path / "persona_dir.pt", tmp_path / "dir.safetensors", "-m", d, "-l", n - 1)
    assert r.exit_code == 0, r.output
    art = load_vector(tmp_path / "dir.safetensors")
    assert art.vectors.shape == (n + 1, 32) and torch.equal(art.vectors[n - 1], v)
    assert art.meta["model_type"] == "qwen3_5" and art.meta["num_hidden_layers"] == n
    r = _import(tmp_path / "persona_dir.pt", tmp_path / "x.safetensors", "-m", d, "-l", n + 1)
    assert r.exit_code == 2 and f"out of range for a model with {n} layers" in r.output


@pytest.mark.slow
def test_single_direction_on_the_embedded_model_steers_like_the_full_table(smol_dir, tmp_path):
    from bakery.models import load_model

    table = torch.randn(31, 576, generator=torch.Generator().manual_seed(5))
    torch.save(table, tmp_path / "full.pt")
    torch.save(table[22].clone(), tmp_path / "persona_dir.pt")
    assert _import(tmp_path / "full.pt", tmp_path / "full.safetensors", "-m", smol_dir).exit_code == 0
    r = _import(tmp_path / "persona_dir.pt", tmp_path / "dir.safetensors", "-m", smol_dir, "-l", 22)
    assert r.exit_code == 0, r.output
    full, one = load_vector(tmp_path / "full.safetensors"), load_vector(tmp_path / "dir.safetensors")
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    a, b, base = _steered_alike(load_model(smol_dir), ids, full, one, 22, 2.0)
    assert torch.equal(a, b) and (a - base).abs().max() > 0.1


def test_single_direction_bakes_like_the_full_table(tiny_models, tmp_path):
    from safetensors.torch import load_file

    from bakery.bakers import bake

    src = tiny_models("llama")
    table = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    torch.save(table, tmp_path / "full.pt")
    torch.save(table[3].clone(), tmp_path / "dir.pt")
    assert _import(tmp_path / "dir.pt", tmp_path / "dir.safetensors", "-m", src, "-l", 3).exit_code == 0
    outs = [bake("bias", src, [(tmp_path / f, 3, 1.5)], tmp_path / f"out-{i}", progress=False)
            for i, f in enumerate(("full.pt", "dir.safetensors"))]
    a, b = (load_file(o / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.allclose(a["model.layers.2.mlp.down_proj.bias"].float(), 1.5 * table[3], atol=1e-6)
