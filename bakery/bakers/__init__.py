"""Baker registry and the one library entry point, :func:`bake`.

A baker class registers itself under its method name with ``@register("name")``;
``get_baker(name)`` returns an instance and ``available()`` lists the names. Importing this
package registers the closed-form bakers (bias, ortho); others (distill) register when imported.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

_REGISTRY: dict[str, type] = {}
_LAZY = {"bias": "bakery.bakers.bias", "ortho": "bakery.bakers.ortho",
         "kl-lora": "bakery.bakers.distill.pipeline", "kl-full": "bakery.bakers.distill.pipeline"}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a baker available as ``--method name``."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        cls.name = getattr(cls, "name", "") or name
        return cls

    return deco


def _load(name: str) -> None:
    mod = _LAZY.get(name)
    if mod and name not in _REGISTRY:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def available() -> list[str]:
    """Registered method names (modules that exist are imported first)."""
    for name in _LAZY:
        _load(name)
    return sorted(_REGISTRY)


def get_baker(name: str):
    from bakery.bakers.base import BakeError

    _load(name)
    if name not in _REGISTRY:
        raise BakeError(f"unknown bake method '{name}'; available: {', '.join(available())}")
    return _REGISTRY[name]()


def coef_required_message(method: str, route: str | None = None, where: str = "") -> str:
    """The error for a term without a coef under a method that needs one (bias, kl-lora, kl-full)."""
    how = f"--method {method}" + (f" --route {route}" if route and route != "bias" else "")
    return (f"--coef is required for {how}{f' ({where})' if where else ''}: the steering strength, "
            "e.g. the one `bakery sweep` recommends (pass --coef C, or coef: C in the recipe term)")


def fmt_float(x: float) -> str:
    """A float for a command line: short (``3``, ``0.01``) but exact, so it reads back the same."""
    x = float(x)
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def _as_terms(terms: Iterable[Any], *, method: str = "", needs_coef: bool = False,
              route: str | None = None, num_layers: int | None = None):
    from bakery.bakers.base import BakeError, Term
    from bakery.vectors.artifact import VectorArtifact, load_vector

    out = []
    for t in terms:
        if isinstance(t, Term):
            out.append(t)
            continue
        if isinstance(t, dict):
            t = (t.get("vector"), t.get("layer"), t.get("coef"), t.get("trait"))
        vec, layer, coef, *rest = (*t, None) if len(t) == 3 else t
        trait = rest[0] if rest else None
        if layer is None:
            raise BakeError("every term needs a layer (--layer L: row L of the vector, the output "
                            "of block L-1)")
        if coef is None and needs_coef:  # never a silent 1.0: the strength is the bake
            raise BakeError(coef_required_message(method, route))
        path = None
        if not isinstance(vec, VectorArtifact):
            if vec is None:
                raise BakeError("a term has no vector: pass --vector FILE or --trait NAME")
            path = Path(vec)
            vec = load_vector(path, num_layers=num_layers)  # sizes a llama.cpp control vector
        # a method without a strength (ortho) records 1.0: the direction's scale is irrelevant
        out.append(Term(vec, int(layer), float(coef if coef is not None else 1.0), trait, path))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def default_output(model_name: str, method: str, terms: Sequence, route: str, site: str,
                   options: dict[str, Any], root: str | os.PathLike = "exports") -> Path:
    """A descriptive folder under ``exports/``: model-trait-method[-route]-L{layer}[-c{coef}]."""
    model = _slug(Path(str(model_name)).name)
    traits = "+".join(dict.fromkeys(_slug(t.trait) for t in terms))
    layers = "+".join(str(t.layer) for t in terms)
    parts = [model, traits, method]
    if method == "bias" and route == "rank1":
        parts.append("rank1")
    if site == "attn-out":
        parts.append("attn")
    parts.append(f"L{layers}")
    if method == "bias":
        parts.append("c" + "+".join(f"{t.coef:g}" for t in terms))
    if method == "ortho" and options.get("add") not in (None, 0, 0.0):
        parts.append(f"add{float(options['add']):g}")
    return Path(root) / "-".join(parts)


# options that ``bakery bake`` has a flag for; any other option set makes the reproduce command
# read the export's own bake.yaml, which records every option
_FLAG_OPTIONS = {"embeddings", "blocks", "per_layer", "add", "calibration", "positions"}


def reproduce_command(req, out: Path) -> str:
    """The ``bakery bake`` command that redoes this bake from the export's own vector files."""
    from bakery.io.export import vector_file_for

    opts = {k: v for k, v in req.options.items() if v is not None}
    rank1 = req.method == "bias" and req.route == "rank1"
    args = ["bakery", "bake", "--method", req.method, "--model", req.model_name]
    if rank1:
        args += ["--route", "rank1"]
    if req.site != "resid-out":
        args += ["--site", req.site]
    if len(req.terms) == 1 and not set(opts) - _FLAG_OPTIONS:
        t = req.terms[0]
        args += ["--vector", f"{out}/{vector_file_for(t.trait)}", "--layer", str(t.layer)]
        if req.method == "bias":
            args += ["--coef", fmt_float(t.coef)]
    else:  # several terms, or an option with no flag (ridge, calibration_tokens, ...)
        args += ["--recipe", f"{out}/bake.yaml"]
    if opts.get("embeddings") and opts["embeddings"] != "ablate":
        args += ["--embeddings", opts["embeddings"]]
    if opts.get("blocks") not in (None, "all"):
        b = opts["blocks"]
        args += ["--blocks", b if isinstance(b, str) else ",".join(map(str, b))]
    if opts.get("per_layer"):
        args += ["--per-layer"]
    if opts.get("add") not in (None, 0, 0.0):
        args += ["--add", fmt_float(opts["add"])]
    if opts.get("calibration") not in (None, "generate"):
        args += ["--calibration", opts["calibration"]]
    if rank1 and opts.get("positions") not in (None, "all"):  # the CLI takes --positions only with rank1
        args += ["--positions", opts["positions"]]
    if tuple(req.target_engines) != ("transformers", "vllm", "sglang"):
        args += ["--target-engine", ",".join(req.target_engines)]
    args += ["-o", str(out)]
    return shlex.join(args)


def bake(method: str, model: str | os.PathLike | None, terms: Iterable[Any],
         out: str | os.PathLike | None = None, *, route: str = "bias", site: str = "resid-out",
         target_engines: str | Sequence[str] | None = None, force: bool = False,
         command: str | None = None, max_shard_bytes: int | None = None, progress: bool = True,
         **options: Any) -> Path:
    """Bake ``terms`` into a copy of ``model`` and return the export folder.

    ``terms``: :class:`Term` objects or ``(vector, layer, coef[, trait])`` tuples, where vector is
    a file or a :class:`~bakery.vectors.artifact.VectorArtifact`. Options: ``embeddings`` ("ablate" or
    "keep"), ``blocks``, ``per_layer``, ``add`` (ortho); ``calibration`` ("generate" or
    "prompts"), ``calibration_tokens``, ``calibration_prompts``, ``ridge`` (rank1). Nothing is written unless the whole bake succeeds.
    """
    from bakery.arch import num_layers_of
    from bakery.bakers.base import BakeRequest, check_terms, parse_engines
    from bakery.io.checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, atomic_folder, check_output
    from bakery.io.export import write_export
    from bakery.models import DEFAULT_MODEL, read_config, resolve_model

    model_name = str(model or DEFAULT_MODEL)
    model_dir = resolve_model(model_name)
    baker = get_baker(method)
    config = read_config(model_dir)
    resolved = _as_terms(terms, method=method, needs_coef=getattr(baker, "needs_coef", True), route=route,
                         num_layers=num_layers_of(config))
    if hasattr(baker, "bake_folder"):  # distilled bakers train and write their own folder
        return baker.bake_folder(model_name, model_dir, resolved, Path(out) if out else None,
                                 force=force, command=command, progress=progress, options=options)
    req = BakeRequest(model_dir=model_dir, model_name=model_name, config=config,
                      terms=resolved, method=method, route=route or "bias",
                      site=site or "resid-out", target_engines=parse_engines(target_engines),
                      options={k: v for k, v in options.items() if v is not None})
    check_terms(req)
    reader = CheckpointReader(model_dir)
    out = Path(out) if out else default_output(model_name, method, req.terms, req.route, req.site,
                                               req.options)
    check_output(out, model_dir, force=force)
    plan = baker.plan(req, reader)
    req.command = command or reproduce_command(req, out)
    with atomic_folder(out, force=force) as tmp:
        write_export(tmp, req, plan, final=out, progress=progress,
                     max_shard_bytes=max_shard_bytes or DEFAULT_SHARD_BYTES)
    return out


__all__ = ["register", "get_baker", "available", "bake", "default_output"]
