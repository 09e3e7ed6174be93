"""Streaming safetensors reader/writer and the atomic output folder."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bakery.io.checkpoint import INDEX_FILE, CheckpointError, CheckpointReader, OutTensor, ShardedWriter
from helpers import fail_after


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(48, 32, generator=g),
        "c.bias": torch.randn(7, generator=g).half(),
        "d.ids": torch.arange(10, dtype=torch.int64),
    }


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    split = [names[:2], names[2:]]
    wm = {}
    for i, part in enumerate(split):
        f = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / f, metadata={"format": "pt"})
        wm.update({n: f for n in part})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def test_reader_single_and_sharded_give_the_same_tensors(tmp_path):
    t = _tensors()
    (tmp_path / "single").mkdir()
    save_file(t, tmp_path / "single" / "model.safetensors")
    _write_sharded(tmp_path / "sharded", t)
    for d in ("single", "sharded"):
        r = CheckpointReader(tmp_path / d)
        assert sorted(r.keys()) == sorted(t)
        for n, x in t.items():
            y = r.get(n)
            assert y.dtype == x.dtype and torch.equal(y, x), (d, n)
    assert len(CheckpointReader(tmp_path / "sharded").files) == 2


def test_writer_copies_bytes_edits_and_shards_with_index(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    t = _tensors()
    save_file(t, src / "model.safetensors")
    r = CheckpointReader(src)
    plan = [OutTensor(n, i.dtype, i.shape, source=i) for n, i in r.tensors.items() if n != "b.weight"]
    plan.append(OutTensor("b.weight", "F32", (48, 32), produce=lambda: r.get("b.weight") * 2))
    plan.append(OutTensor("new.bias", "BF16", (32,), produce=lambda: torch.ones(32, dtype=torch.bfloat16)))
    out = tmp_path / "out"
    out.mkdir()
    files = ShardedWriter(out, max_shard_bytes=5000).write(plan)
    names = sorted(p.name for p in files)
    assert INDEX_FILE in names and "model-00001-of-00003.safetensors" in names
    index = json.loads((out / INDEX_FILE).read_text())
    loaded = {}
    for f in set(index["weight_map"].values()):
        with safe_open(str(out / f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
        loaded.update(load_file(out / f))
    assert set(index["weight_map"]) == set(loaded)
    assert torch.equal(loaded["a.weight"], t["a.weight"]) and loaded["a.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["b.weight"], t["b.weight"] * 2)
    assert torch.equal(loaded["d.ids"], t["d.ids"]) and torch.equal(loaded["c.bias"], t["c.bias"])
    assert torch.equal(loaded["new.bias"], torch.ones(32, dtype=torch.bfloat16))
    # the reader reads what the writer wrote
    assert torch.equal(CheckpointReader(out).get("b.weight"), t["b.weight"] * 2)


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    t = _tensors()
    (tmp_path / "s").mkdir()
    save_file(t, tmp_path / "s" / "model.safetensors")
    r = CheckpointReader(tmp_path / "s")
    (tmp_path / "o").mkdir()
    files = ShardedWriter(tmp_path / "o").write([OutTensor(n, i.dtype, i.shape, source=i) for n, i in r.tensors.items()])
    assert [p.name for p in files] == ["model.safetensors"]
    assert (tmp_path / "o" / "model.safetensors").read_bytes() != b""
    assert all(torch.equal(v, t[k]) for k, v in load_file(tmp_path / "o" / "model.safetensors").items())


def test_truncated_shard_is_named(tmp_path):
    _write_sharded(tmp_path / "m", _tensors())
    shard = tmp_path / "m" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 20])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*(corrupt|truncated)"):
        CheckpointReader(tmp_path / "m")


def test_garbage_header_is_a_clear_error(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointReader(tmp_path / "m")


def test_missing_index_and_missing_shard(tmp_path):
    _write_sharded(tmp_path / "m", _tensors())
    (tmp_path / "m" / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        CheckpointReader(tmp_path / "m")
    _write_sharded(tmp_path / "n", _tensors())
    (tmp_path / "n" / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00001-of-00002"):
        CheckpointReader(tmp_path / "n")


def test_no_weights_mentions_conversion(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no safetensors weights.*save_pretrained"):
        CheckpointReader(tmp_path / "m")


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "s").mkdir()
    save_file(_tensors(), tmp_path / "s" / "model.safetensors")
    r = CheckpointReader(tmp_path / "s")
    fail_after(monkeypatch, 1024, lambda: OSError(errno.ENOSPC, "No space left on device"))
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointError, match="no space left"):
        ShardedWriter(tmp_path / "o").write([OutTensor(n, i.dtype, i.shape, source=i) for n, i in r.tensors.items()])
