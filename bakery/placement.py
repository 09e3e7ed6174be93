"""Where models run: device and dtype resolution, and the process-wide default placement.

The library's own default is the CPU in float32 (the exactness checks need it); the command line's
shared ``--device``/``--dtype``/``--device-map`` options replace that default for one command, so
that every library function reached from the command loads its models where the user asked
without each caller passing the placement on. Library functions also take ``device=``/``dtype=``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from bakery.errors import BakeryError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# room left on a device for activations, the KV cache and the CUDA context when deciding by size
HEADROOM = 1.25


class DeviceError(BakeryError):
    """A device, dtype or device map that cannot be used on this machine."""


@dataclass(frozen=True)
class Placement:
    """How to place a model: one device, or a device map spread by accelerate.

    ``device``/``dtype`` are specs (``"auto"`` or a name); ``device_map`` is ``None`` (one device),
    an accelerate strategy (``"auto"``...) or an explicit ``{module: device}`` map, with
    ``max_memory`` (``{device: "20GiB"}``) and ``offload_folder`` for weights placed on ``"disk"``.
    """

    device: str = "cpu"
    dtype: str = "auto"
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[Any, str] | None = None
    offload_folder: str | None = None


_default = Placement()


def default_placement() -> Placement:
    """The placement ``load_model`` uses when a caller names none."""
    return _default


def set_default_placement(placement: Placement | None = None, **changes: Any) -> Placement:
    """Replace the process-wide placement (or some of its fields); returns the previous one."""
    global _default
    previous = _default
    _default = replace(placement or _default, **changes)
    return previous


@contextlib.contextmanager
def using_placement(placement: Placement | None = None, **changes: Any) -> Iterator[Placement]:
    """Within the block, models load with this placement (then the previous one comes back)."""
    previous = set_default_placement(placement, **changes)
    try:
        yield _default
    finally:
        set_default_placement(previous)


def _local_rank() -> int | None:
    rank = os.environ.get("LOCAL_RANK")
    return int(rank) if rank and rank.isdigit() else None


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA (this process's ``LOCAL_RANK`` device under a launcher), then MPS, then CPU.

    Named devices are checked: asking for CUDA on a machine without it is a :class:`DeviceError`.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            rank = _local_rank()
            return torch.device("cuda", rank if rank is not None and rank < torch.cuda.device_count() else 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown device '{spec}': use one of {DEVICE_CHOICES}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(f"device '{spec}' was asked for, but torch sees no CUDA device on this "
                              f"machine (torch {torch.__version__}, {build}). Use --device cpu (or "
                              f"auto), or install a CUDA build of torch on a GPU host.")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device '{spec}' does not exist: this machine has {n} CUDA device(s), "
                              f"cuda:0 to cuda:{n - 1}")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type == "mps" and not _mps_available():
        raise DeviceError(f"device '{spec}' was asked for, but MPS (Apple GPU) is not available here. "
                          "Use --device cpu (or auto).")
    if dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise DeviceError(f"device '{spec}' is not supported: use one of {DEVICE_CHOICES}")
    return dev


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def is_accelerator(device: torch.device) -> bool:
    return device.type in ("cuda", "mps")


def resolve_dtype(spec: str | torch.dtype | None = "auto", device: torch.device | str | None = None,
                  *, accelerator_default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """``auto``: bfloat16 on an accelerator (``accelerator_default``), float32 on the CPU."""
    if isinstance(spec, torch.dtype):
        return spec
    spec = (spec or "auto").strip().lower().removeprefix("torch.")
    if spec == "auto":
        dev = resolve_device(device) if not isinstance(device, torch.device) else device
        return accelerator_default if is_accelerator(dev) else torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"unknown dtype '{spec}': use auto, float32, bfloat16 or float16")
    return DTYPES[spec]


def parse_device_map(text: str | dict | None) -> str | dict[str, Any] | None:
    """``--device-map``: a strategy (auto, balanced, sequential), a JSON object or a JSON file."""
    if text is None or isinstance(text, dict):
        return text
    t = text.strip()
    if t.lower() in DEVICE_MAP_STRATEGIES:
        return t.lower()
    if not t.startswith("{") and Path(t).is_file():
        t = Path(t).read_text()
    try:
        value = json.loads(t)
    except json.JSONDecodeError:
        raise DeviceError(f"--device-map takes {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object "
                          f"{{\"module.name\": \"cuda:0\" | 0 | \"cpu\" | \"disk\"}} or a JSON file; "
                          f"got '{text}'") from None
    if not isinstance(value, dict) or not value:
        raise DeviceError("--device-map JSON must be a non-empty object of module name -> device")
    return value


def parse_max_memory(items: str | dict | None) -> dict[Any, str] | None:
    """``--max-memory 0=20GiB,1=40GiB,cpu=64GiB``: accelerate's per-device budget."""
    if items is None or isinstance(items, dict):
        return items
    out: dict[Any, str] = {}
    for part in filter(None, (p.strip() for p in items.split(","))):
        key, sep, size = part.partition("=")
        if not sep or not size.strip():
            raise DeviceError(f"--max-memory takes DEVICE=SIZE pairs such as 0=20GiB,cpu=64GiB; got '{part}'")
        key = key.strip().lower().removeprefix("cuda:")
        out[int(key) if key.isdigit() else key] = size.strip()
    return out or None


def checkpoint_bytes(model_dir: str | os.PathLike, dtype: torch.dtype) -> int:
    """About how many bytes the weights of ``model_dir`` take in ``dtype``."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    stored = sum(f.stat().st_size for f in files)
    try:
        cfg = json.loads((d / "config.json").read_text())
        src = DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), torch.float32)
    except (OSError, ValueError):
        src = torch.float32
    return int(stored * dtype.itemsize / src.itemsize)


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` of weights (plus headroom) fit in the free memory of a CUDA device."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes * HEADROOM <= free


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (``None`` where torch cannot say: CPU, MPS)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings, also for a model that
    accelerate spread over devices (a dispatched model's first parameter may sit on ``meta``)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    if emb is not None:
        w = getattr(emb, "weight", None)
        if w is not None and w.device.type != "meta":
            return w.device
    return model.device


def placement_of(model: torch.nn.Module) -> dict[str, Any]:
    """A record of where every parameter is: devices, dtypes and accelerate's device map. Two
    records differ when anything moved or cast the model."""
    return {
        "params": {n: (str(p.device), str(p.dtype)) for n, p in model.named_parameters()},
        "device_map": dict(getattr(model, "hf_device_map", None) or {}),
    }


def auto_batch_size(config: dict[str, Any] | Any, tokens_per_row: int, *, default: int,
                    device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                    hidden_states: bool = False, limit: int = 256, free_bytes: int | None = None) -> int:
    """Rows per batch for generation, capture or scoring of ``tokens_per_row`` tokens a row.

    On a CUDA device: as many rows as half of its free memory holds (KV cache, activations, the
    float32 logits of every position, and with ``hidden_states`` every layer's states), at most
    ``limit``. Where torch cannot tell the free memory (CPU, MPS): ``default``, the batch size
    these commands always used there. Call it after the model is loaded (its weights are then
    no longer free memory).
    """
    if not isinstance(config, dict):
        config = config.to_dict()
    config = config.get("text_config") or config
    dev = device if isinstance(device, torch.device) else resolve_device(device or default_placement().device)
    free = free_bytes if free_bytes is not None else free_memory(dev)
    if free is None:
        return default
    size = resolve_dtype(dtype if dtype is not None else default_placement().dtype, dev).itemsize
    hidden = int(config.get("hidden_size") or config.get("n_embd"))
    layers = int(config.get("num_hidden_layers") or config.get("n_layer"))
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    vocab = int(config.get("vocab_size") or 0)
    per_token = (2 * layers * kv_heads * head_dim * size      # KV cache
                 + (8 * hidden + 3 * inter) * size             # one block's working activations
                 + 4 * vocab                                   # float32 logits
                 + (4 * (layers + 1) * hidden if hidden_states else 0))
    rows = int(free * 0.5) // max(per_token * max(tokens_per_row, 1), 1)
    return max(1, min(limit, rows))
