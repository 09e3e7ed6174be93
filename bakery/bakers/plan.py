"""What a baker returns: the facts of its bake (:class:`BakeFacts`) and its weights
(:class:`Weights`); for the closed-form bakers a :class:`BakePlan` of tensor edits and additions,
streamed tensor by tensor from the source checkpoint into the export's shards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bakery.bakers.checks import refuse_quantized
from bakery.bakers.errors import BakeError
from bakery.arch import spec_for
from bakery.io.checkpoint import DTYPES, CheckpointReader, OutTensor, ShardedWriter, TensorInfo
from bakery.io.names import TensorNameError, TensorNames

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

# float32 in (its own copy: may edit in place), float32 out; a ``native`` edit keeps any dtype
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class BakeFacts:
    """What a baker reports about the weights it wrote: the manifest's and the card's facts."""

    route: str = ""
    site: str = "resid-out"
    positions: str = "all"  # the runtime steering the bake stands for
    exact: bool = False
    engines: dict[str, str] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    card_section: tuple[str, str] | None = None  # (name, markdown) of a baker's own card section


class Weights:
    """What a baker built, ready to be written: :meth:`write` puts the weights and ``config.json``
    into the (temporary) export folder and returns the facts."""

    def write(self, folder: Path, *, progress: bool, max_shard_bytes: int | None) -> BakeFacts:
        raise NotImplementedError


@dataclass(kw_only=True)
class BakePlan(BakeFacts, Weights):
    """A closed-form baker's answer: tensor edits (float32 functions), added tensors and the output
    config, streamed tensor by tensor into the export."""

    reader: CheckpointReader
    config: dict[str, Any]
    edits: dict[str, list[Edit]] = field(default_factory=dict)
    rowwise: set[str] = field(default_factory=set)  # tensors whose edits act on each row alone
    native: set[str] = field(default_factory=set)  # tensors whose edits all take the stored dtype
    added: dict[str, tuple[str, tuple[int, ...], Callable[[], torch.Tensor] | TensorInfo]] = field(default_factory=dict)

    def write(self, folder: Path, *, progress: bool, max_shard_bytes: int | None) -> BakeFacts:
        write_plan(self, folder, progress=progress, max_shard_bytes=max_shard_bytes)
        return self

    def __post_init__(self) -> None:
        refuse_quantized(self.config)
        # the source checkpoint's names, from the source config (a re-hosting bake changes config)
        self.names = TensorNames(self.reader.keys(), spec_for(self.config), dict(self.config))

    def find(self, name: str) -> str | None:
        """The checkpoint (or added) tensor that holds model tensor ``name``, or None."""
        if name in self.added or name in self.reader:
            return name
        found = self.names.find(name)
        if found is not None:
            return found
        own = self.names.to_checkpoint(name)
        return own if own in self.added else None

    def key(self, name: str) -> str:
        """Like :meth:`find`, but a :class:`BakeError` naming what was looked for."""
        found = self.find(name)
        if found is None:
            try:
                self.names.resolve(name)
            except TensorNameError as e:
                raise BakeError(str(e)) from None
        return found

    def _float_source(self, name: str) -> None:
        dtype = self.reader.tensors[name].dtype
        if dtype not in _FLOAT_DTYPES:
            raise BakeError(f"{name} is stored as {dtype}, a quantized or integer type: bakery edits "
                            "full-precision weights. Bake the unquantized checkpoint, then quantize the export.")

    def edit(self, name: str, fn: Edit, *, rowwise: bool = False, native: bool = False) -> None:
        """Queue ``fn`` on tensor ``name`` (a model-side name, resolved to the checkpoint's own
        the way transformers does, or a checkpoint name). ``rowwise``: ``fn`` maps any block of
        rows on its own, so a large tensor can be streamed in blocks (bounded memory). ``native``:
        ``fn`` takes the tensor in any dtype and returns it in that dtype, doing its float32 math
        itself in cache-sized blocks, so the export skips a whole float32 copy of the tensor."""
        name = self.key(name)
        if name in self.added:
            dtype, shape, make = self.added[name]
            base = make if callable(make) else None
            if base is None:
                raise BakeError(f"internal error: cannot edit copied tensor {name}")
            self.added[name] = (dtype, shape, lambda make=make, fn=fn: fn(make().float()))
            return
        self._float_source(name)
        first = name not in self.edits
        for flag, kept in ((rowwise, self.rowwise), (native, self.native)):
            if first and flag:
                kept.add(name)
            elif not flag:
                kept.discard(name)
        self.edits.setdefault(name, []).append(fn)

    def _new_bias(self, name: str, weight: str) -> tuple[str, str]:
        """(checkpoint name for a new bias ``name``, checkpoint name of its ``weight``)."""
        w = self.key(weight)
        return self.names.bias_of(w) if weight.endswith(".weight") else self.names.to_checkpoint(name), w

    def add_bias(self, name: str, delta: torch.Tensor, weight: str, *, conv1d: bool = False) -> None:
        """Add ``delta`` to bias ``name`` (created, in the weight's dtype and named in the
        checkpoint's style, if the checkpoint has none). A fused ``[experts, hidden]`` bias gets
        ``delta`` on every row."""
        delta = delta.detach().float().clone()
        if self.find(name) is not None:
            self.edit(name, lambda b, d=delta: b + d)
            return
        new, weight = self._new_bias(name, weight)
        self._float_source(weight)  # a new bias takes the weight's dtype
        w = self.reader.tensors[weight]
        out = w.shape[1] if conv1d else w.shape[0]
        if delta.shape != (out,):
            raise BakeError(f"vector of size {delta.numel()} does not fit {name} ({out} outputs)")
        self.added[new] = (w.dtype, (out,), lambda d=delta: d.clone())

    def zero_bias(self, name: str, weight: str) -> None:
        """Explicit zeros for a sibling bias that a config flag creates."""
        if self.find(name) is not None:
            return
        if self.find(weight) is None:
            raise BakeError(f"the checkpoint has no {weight}, so bakery cannot size {name}")
        new, weight = self._new_bias(name, weight)
        w = self.reader.tensors[weight]
        self._float_source(weight)
        self.added[new] = (w.dtype, (w.shape[0],), lambda n=w.shape[0]: torch.zeros(n))

    def copy_as(self, name: str, source: str) -> None:
        """A new tensor (named in the checkpoint's style) that is a byte copy of an existing one
        (untying embeddings)."""
        info = self.reader.tensors[self.key(source)]
        self.added[self.names.to_checkpoint(name)] = (info.dtype, info.shape, info)


# ---- writing a plan: every tensor streamed from the source, edited ones in float32 ----------
ROW_BLOCK_BYTES = 32 * 1024**2  # float32 working block for row-wise edits of large tensors


def _apply(reader, name: str, edits, dtype: torch.dtype, rowwise: bool, native: bool):
    info = reader.tensors[name]

    def run(x: torch.Tensor) -> torch.Tensor:  # x: a fresh copy in the stored dtype
        x = x if native else x.float()  # edits may work in place
        for fn in edits:
            x = fn(x)
        return x.to(dtype)  # a no-op for native edits

    def produce() -> torch.Tensor:
        return run(reader.get(name))

    def produce_blocks():
        per_row = max(1, info.shape[1])
        rows = max(1, ROW_BLOCK_BYTES // (4 * per_row))
        for i in range(0, info.shape[0], rows):
            yield run(reader.get_rows(name, i, i + rows))

    if rowwise and len(info.shape) == 2 and 4 * info.shape[0] * info.shape[1] > ROW_BLOCK_BYTES:
        return produce_blocks
    return produce


def output_tensors(plan: BakePlan) -> list[OutTensor]:
    """The full output list: copies, edited tensors (float32 math, source dtype) and additions."""
    reader = plan.reader
    out: list[OutTensor] = []
    for name, info in reader.tensors.items():
        if name in plan.edits:
            out.append(OutTensor(name, info.dtype, info.shape,
                                 produce=_apply(reader, name, plan.edits[name], info.torch_dtype,
                                                name in plan.rowwise, name in plan.native)))
        else:
            out.append(OutTensor(name, info.dtype, info.shape, source=info))
    for name, (dtype, shape, make) in sorted(plan.added.items()):
        if callable(make):
            out.append(OutTensor(name, dtype, tuple(shape),
                                 produce=lambda make=make, d=DTYPES[dtype]: make().float().to(d)))
        else:
            out.append(OutTensor(name, dtype, tuple(shape), source=make))
    return out


def write_overlay(folder: Path, source_dir: Path, config: dict[str, Any], trained_dir: Path, *,
                  rename: Callable[[str], str] = lambda n: n, progress: bool = False,
                  max_shard_bytes: int | None = None) -> list[str]:
    """The source checkpoint, streamed, with each tensor of the checkpoint in ``trained_dir``
    (``rename`` maps its names to the source model's) in place of the source tensor it differs
    from. Every other tensor (a wrapper's vision tower, what training left alone) is copied byte
    for byte, and ``config.json`` is the source's ``config``. Returns the replaced names."""
    from bakery.io.checkpoint import CheckpointError

    src, new = CheckpointReader(source_dir), CheckpointReader(trained_dir)
    plan = BakePlan(reader=src, config=dict(config))
    replaced = []
    for n, info in new.tensors.items():
        target = next((t for t in (plan.names.find(n), plan.names.find(rename(n))) if t is not None), None)
        if target is None or src.tensors[target].shape != info.shape:
            raise CheckpointError(
                f"the trained weights hold {n} {tuple(info.shape)}, which the source checkpoint "
                f"{source_dir} has no tensor of that shape for: its layout is not what transformers "
                f"writes for a {spec_for(config).model_type} model (a bug in bakery: please report it)")
        t = new.get(n).to(src.tensors[target].torch_dtype).contiguous()
        if not torch.equal(t.view(-1).view(torch.uint8), src.get(target).contiguous().view(-1).view(torch.uint8)):
            plan.edit(target, lambda x, n=n: new.get(n))
            replaced.append(target)
    write_plan(plan, folder, progress=progress, max_shard_bytes=max_shard_bytes)
    return sorted(replaced)


def write_plan(plan: BakePlan, folder: Path, *, progress: bool, max_shard_bytes: int | None) -> None:
    """A closed-form bake's weights, streamed tensor by tensor, and its config."""
    from tqdm import tqdm

    tensors = output_tensors(plan)
    writer = ShardedWriter(folder, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
    with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc="writing weights",
              disable=not progress, leave=False) as bar:
        writer.write(tensors, progress=bar.update)
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
