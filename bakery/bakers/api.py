"""The library's one entry point, :func:`bake`: terms and a method's settings in, an export folder
out, through the one export path (:func:`bakery.bakers.export.write_export`)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Iterable

from bakery.arch import num_layers_of
from bakery.bakers.checks import check_terms, refuse_quantized
from bakery.bakers.config import fmt_float
from bakery.bakers.errors import BakeError
from bakery.bakers.export import vector_file_for, write_export
from bakery.bakers.registry import coef_message, get_baker, make_config
from bakery.bakers.request import BakeRequest, Term
from bakery.io.folders import EXPORT, check_output
from bakery.models import DEFAULT_MODEL, read_config, resolve_model
from bakery.naming import slug
from bakery.vectors.artifact import VectorArtifact
from bakery.vectors.load import load_vector


def resolve_terms(terms: Iterable[Any], *, method: str, uses_coef: bool, num_layers: int | None = None):
    """:class:`Term` objects from terms, dicts or ``(vector, layer, coef[, trait])`` tuples."""
    out = []
    for t in terms:
        if isinstance(t, dict):
            t = (t.get("vector"), t.get("layer"), t.get("coef"), t.get("trait"))
        if isinstance(t, Term):
            vec, layer, coef, trait, path = t.vector, t.layer, t.coef, t.trait, t.vector_path
        else:
            vec, layer, coef, *rest = (*t, None) if len(t) == 3 else t
            trait, path = (rest[0] if rest else None), None
        if layer is None:
            raise BakeError("every term needs a layer (--layer L: row L of the vector, the output "
                            "of block L-1)")
        if (coef is None) == uses_coef:  # never a silent 1.0, never an ignored strength
            raise BakeError(coef_message(method, uses_coef))
        if not isinstance(vec, VectorArtifact):
            if vec is None:
                raise BakeError("a term has no vector: pass --vector FILE or --trait NAME")
            path = Path(vec)
            vec = load_vector(path, num_layers=num_layers)  # sizes a llama.cpp control vector
        out.append(Term(vec, int(layer), float(coef) if coef is not None else None, trait, path))
    return out


def default_output(req, baker, root: str | os.PathLike = "exports") -> Path:
    """A descriptive folder under ``exports/``: model-trait-method[-tags]-L{layer}[-tags]."""
    before, after = baker.name_tags(req)
    model = slug(Path(str(req.model_name)).name)
    traits = "+".join(dict.fromkeys(slug(t.trait) for t in req.terms))
    layers = "+".join(str(t.layer) for t in req.terms)
    return Path(root) / "-".join([model, traits, req.method, *before, f"L{layers}", *after])


def reproduce_command(req, baker) -> str:
    """The ``bakery bake`` command that redoes this bake from the export's own files."""
    out = req.out
    args = ["bakery", "bake", "--method", req.method, "--model", req.model_name]
    if len(req.terms) == 1:
        t = req.terms[0]
        args += ["--vector", f"{out}/{vector_file_for(t.trait)}", "--layer", str(t.layer)]
        if baker.uses_coef:
            args += ["--coef", fmt_float(t.coef)]
    else:  # several terms: the export's bake.yaml lists them
        args += ["--recipe", f"{out}/bake.yaml"]
    return shlex.join([*args, *req.cfg.reproduce_args(), "-o", str(out)])


def prepare(method: str, model: str | os.PathLike | None, terms: Iterable[Any],
            out: str | os.PathLike | None = None, *, force: bool = False, config: Any = None,
            **options: Any) -> BakeRequest:
    """The checked bake of ``terms`` into ``model`` with ``method``'s settings, before anything
    runs: terms resolved and fitted to the model, the output folder chosen and free (or
    ``force``), the reproduce command written. :func:`bake` builds and exports it."""
    model_name = str(model or DEFAULT_MODEL)
    baker = get_baker(method)
    if config is not None and options:
        raise BakeError("pass the method's settings either as config= or as keywords, not both")
    cfg = config if config is not None else make_config(method, options)
    model_dir = resolve_model(model_name)
    model_config = read_config(model_dir)
    refuse_quantized(model_config)
    resolved = resolve_terms(terms, method=method, uses_coef=baker.uses_coef,
                             num_layers=num_layers_of(model_config))
    req = BakeRequest(model_dir=model_dir, model_name=model_name, config=model_config,
                      terms=resolved, method=method, cfg=cfg)
    if baker.max_terms is not None and len(req.terms) > baker.max_terms:
        raise BakeError(f"--method {method} bakes one term (vector, layer) at a time; got "
                        f"{len(req.terms)}. Bake them one at a time, or use --method bias for a sum")
    check_terms(req)
    req.out = Path(out) if out else default_output(req, baker)
    check_output(req.out, kind=EXPORT, source=model_dir, force=force)
    req.command = reproduce_command(req, baker)
    return req


def bake(method: str, model: str | os.PathLike | None, terms: Iterable[Any],
         out: str | os.PathLike | None = None, *, force: bool = False,
         max_shard_bytes: int | None = None, progress: bool = True, config: Any = None,
         **options: Any) -> Path | None:
    """Bake ``terms`` into a copy of ``model`` and return the export folder.

    ``terms``: :class:`~bakery.bakers.request.Term` objects or ``(vector, layer, coef[, trait])``
    tuples, where vector is a file or a :class:`~bakery.vectors.artifact.VectorArtifact`.
    ``options`` (or ``config``, the method's typed config) are the method's settings, e.g.
    ``route="rank1"`` for bias, ``add=2.0`` for ortho, ``rank=16`` for kl-lora; one that the method
    does not take is refused. Nothing is written unless the whole bake succeeds. Returns ``None``
    on the non-main processes of a distributed (accelerate) run.
    """
    req = prepare(method, model, terms, out, force=force, config=config, **options)
    weights = get_baker(method).build(req, progress=progress)
    if weights is None:  # a non-main process of a distributed run: the main one writes
        return None
    return write_export(req, weights, force=force, progress=progress, max_shard_bytes=max_shard_bytes)
