"""Streaming safetensors I/O for closed-form bakes: read a checkpoint tensor by tensor, write
sharded output with the standard names, into an atomic output folder.

The model is never instantiated. The reader parses safetensors headers itself (so a truncated or
corrupt shard is named in a clear error before anything is written) and reads one tensor at a
time. The writer plans the whole layout first (names, dtypes, shapes), writes each shard's header,
then streams the tensor bytes: untouched tensors are copied byte for byte from the source file,
edited ones are computed (in float32 by the caller) and written in the source dtype. Peak memory
is one tensor, not one shard. The output folder itself (atomic, never overwritten without
``--force``) is :mod:`bakery.io.folders`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from bakery.errors import BakeryError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3  # 2 GiB per shard before the next one starts
_COPY_CHUNK = 16 * 1024**2

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2


class CheckpointError(BakeryError):
    """A checkpoint that cannot be read, or an output that cannot be written; nothing was kept."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name (``BF16``), shape and byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header; check every byte range lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is corrupt: {size} bytes, too short for a safetensors header")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > size - 8 or hlen > 100 * 1024**2:
                raise CheckpointError(
                    f"{path} is corrupt or truncated: its header claims {hlen} bytes but the file "
                    f"has {size}. Re-download or re-save this shard.")
            header = json.loads(f.read(hlen))
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors: {e}. The shard is corrupt; "
                              "re-download or re-save it.") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (a, b) = h["dtype"], tuple(int(x) for x in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: bad header entry for {name}") from e
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}, which bakery cannot edit")
        if b - a != math.prod(shape) * _dtype_size(dtype) or base + b > size:
            raise CheckpointError(
                f"{path} is corrupt or truncated: tensor {name} needs bytes {a}..{b} of the data "
                f"section but the file holds {size - base}. Re-download or re-save this shard.")
        out[name] = TensorInfo(name, path, dtype, shape, base + a, b - a)
    return out, meta


class CheckpointReader:
    """A safetensors checkpoint folder (``model.safetensors`` or shards with an index)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        index = self.folder / INDEX_FILE
        single = self.folder / SINGLE_FILE
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shard(s) that are missing: {', '.join(missing)}. "
                    "The download is incomplete; fetch the missing files.")
            for f in files:
                infos, meta = read_header(self.folder / f)
                self.metadata.update(meta)
                for name, info in infos.items():
                    if weight_map.get(name) == f:
                        self.tensors[name] = info
            absent = [n for n, f in weight_map.items() if n not in self.tensors]
            if absent:
                raise CheckpointError(
                    f"{index} maps {len(absent)} tensor(s) to shards that do not hold them "
                    f"(e.g. {absent[0]}): the index and the shards disagree.")
        elif single.is_file():
            self.tensors, self.metadata = read_header(single)
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if len(shards) > 1 or any("-of-" in s.name for s in shards):
                raise CheckpointError(
                    f"{self.folder} has sharded weights ({', '.join(s.name for s in shards[:3])}...) "
                    f"but no {INDEX_FILE}: restore the index file that came with the shards.")
            if len(shards) == 1:
                self.tensors, self.metadata = read_header(shards[0])
            else:
                other = [p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".gguf")]
                hint = (f" (found {', '.join(other[:3])}: convert to safetensors with "
                        "save_pretrained first)") if other else ""
                raise CheckpointError(f"{self.folder} has no safetensors weights{hint}")
        if not self.tensors:
            raise CheckpointError(f"{self.folder}: the checkpoint holds no tensors")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh, writable copy) in its stored dtype."""
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buf)
        if got != info.nbytes:
            raise CheckpointError(f"{info.file} is truncated: tensor {name} could not be read")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of a tensor, reading only those bytes."""
        info = self.tensors[name]
        row = math.prod(info.shape[1:]) * _dtype_size(info.dtype)
        stop = min(stop, info.shape[0])
        buf = bytearray(row * (stop - start))
        with open(info.file, "rb") as f:
            f.seek(info.start + start * row)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{info.file} is truncated: tensor {name} could not be read")
        if not buf:
            return torch.empty((0, *info.shape[1:]), dtype=info.torch_dtype)
        return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(stop - start, *info.shape[1:])


# ---- writing ------------------------------------------------------------------------------
Producer = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: copied from ``source`` or computed by ``produce``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None
    produce: Producer | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _dtype_size(self.dtype)


def _no_space(path: Path, need: int) -> CheckpointError:
    return CheckpointError(
        f"no space left on the device while writing {path} (the export needs about "
        f"{need / 1e9:.2f} GB). Free space or choose another -o folder; nothing was kept.")


class ShardedWriter:
    """Writes planned tensors as ``model-0000i-of-0000N.safetensors`` + index (one file:
    ``model.safetensors``), streaming one tensor at a time."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes

    def plan(self, tensors: Sequence[OutTensor]) -> list[list[OutTensor]]:
        shards: list[list[OutTensor]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        return shards

    # The two methods every output byte goes through (tests simulate a full disk here).
    def _write(self, fh, data) -> None:
        view = memoryview(data).cast("B")
        while view:  # an unbuffered file may write less than asked
            n = fh.write(view)
            view = view[n:]

    def _copy(self, src, fh, offset: int, length: int) -> None:
        """Copy ``length`` bytes at ``offset`` of ``src`` to the end of ``fh``, in the kernel where
        it can (``copy_file_range``), so an untouched tensor costs what a file copy costs."""
        left = length
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    n = os.copy_file_range(src.fileno(), fh.fileno(), min(left, 1 << 30), offset)
                    if n == 0:
                        raise CheckpointError(f"{src.name} ended early while copying: the shard is truncated")
                    offset += n
                    left -= n
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    raise
        src.seek(offset)
        while left:
            chunk = src.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise CheckpointError(f"{src.name} ended early while copying: the shard is truncated")
            self._write(fh, chunk)
            left -= len(chunk)

    def write(self, tensors: Sequence[OutTensor], progress: Callable[[int], None] | None = None) -> list[Path]:
        """Write all tensors; return the files written. ``progress(nbytes)`` after each tensor."""
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise RuntimeError("internal error: the output plan names a tensor twice")
        shards = self.plan(tensors)
        n = len(shards)
        files = ([SINGLE_FILE] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        need = sum(t.nbytes for t in tensors)
        weight_map: dict[str, str] = {}
        written: list[Path] = []
        sources: dict[Path, object] = {}
        try:
            for fname, shard in zip(files, shards):
                path = self.folder / fname
                written.append(path)
                self._write_shard(path, shard, sources, progress)
                weight_map.update({t.name: fname for t in shard})
            if n > 1:
                index = {"metadata": {"total_size": need}, "weight_map": dict(sorted(weight_map.items()))}
                with open(self.folder / INDEX_FILE, "wb", buffering=0) as fh:
                    self._write(fh, (json.dumps(index, indent=2) + "\n").encode())
                written.append(self.folder / INDEX_FILE)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(self.folder, need) from e
            raise
        finally:
            for fh in sources.values():
                fh.close()
        return written

    def _write_shard(self, path: Path, shard: list[OutTensor], sources: dict, progress) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in shard:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)  # align the data section like safetensors does
        with open(path, "wb", buffering=0) as fh:  # raw: kernel copies and writes interleave
            self._write(fh, struct.pack("<Q", len(hbytes)))
            self._write(fh, hbytes)
            for t in shard:
                if t.produce is not None:
                    x = t.produce()
                    # a producer returns the tensor, or an iterator of row blocks (bounded memory)
                    parts = [x] if isinstance(x, torch.Tensor) else x
                    done = 0
                    for part in parts:
                        if part.dtype != DTYPES[t.dtype] or tuple(part.shape[1:]) != t.shape[1:]:
                            raise RuntimeError(
                                f"internal error: {t.name} came out as {tuple(part.shape)} "
                                f"{part.dtype}, planned {t.shape} {t.dtype}")
                        if part.numel():
                            self._write(fh, part.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                        done += part.numel() * part.element_size()
                        del part
                    if done != t.nbytes:
                        raise RuntimeError(f"internal error: {t.name} came out as {done} bytes, "
                                              f"planned {t.nbytes}")
                    del x, parts
                else:
                    src = t.source
                    if src.file not in sources:
                        sources[src.file] = open(src.file, "rb")
                    self._copy(sources[src.file], fh, src.start, src.nbytes)
                if progress:
                    progress(t.nbytes)
