"""``bakery vectors``: inspect, compare and convert vector artifacts."""

from __future__ import annotations

import json

import click

from bakery.cli.common import clear_errors, force_option
from bakery.io.folders import CONTROL_VECTOR, VECTOR, atomic_files
from bakery.naming import describe_layer
from bakery.vectors.artifact import cosine_by_layer
from bakery.vectors.load import load_vector



@click.group()
def vectors() -> None:
    """Inspect, compare and convert vector artifacts."""


@vectors.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--num-layers", type=int, default=None, help="Layer count, for a .gguf control vector.")
@clear_errors
def info(file, num_layers):
    """Per-layer norms and metadata of FILE."""
    art = load_vector(file, num_layers=num_layers)
    per_layer = ("per_layer_norm", "layers", "auc", "description")  # shown in the table instead
    meta = {k: v for k, v in art.meta.items() if k not in per_layer}
    click.echo(f"{file}: {art.num_layers + 1} rows x hidden {art.hidden_size} "
               f"({art.num_layers} layers), sha256 {art.sha256()[:16]}")
    for k, v in meta.items():
        click.echo(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    auc = art.meta.get("auc") if isinstance(art.meta.get("auc"), list) else None
    click.echo(f"\n{'row':>4}  {'norm':>10}  {'auc':>6}  meaning")
    for L, n in enumerate(art.norms()):
        meaning = describe_layer(L) if L < art.num_layers else "after the final norm (not bakeable)"
        a = f"{auc[L]:.3f}" if auc and L < len(auc) and auc[L] is not None else ""
        click.echo(f"{L:>4}  {n:>10.4f}  {a:>6}  {meaning}")


@vectors.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@clear_errors
def compare(a, b):
    """Per-layer cosine similarity of two vector files of the same model shape."""
    va, vb = load_vector(a), load_vector(b)
    cos = cosine_by_layer(va, vb)
    click.echo(f"{'row':>4}  {'cosine':>7}  {'|a|':>9}  {'|b|':>9}")
    for L, (c, na, nb) in enumerate(zip(cos, va.norms(), vb.norms())):
        click.echo(f"{L:>4}  {c:>7.4f}  {na:>9.3f}  {nb:>9.3f}")
    click.echo(f"mean cosine over rows 1..{va.num_layers - 1}: "
               f"{sum(cos[1:-1]) / max(len(cos) - 2, 1):.4f}")


@vectors.command("export-gguf")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--model-hint", default="llama", show_default=True)
@force_option("OUT if it is a previous llama.cpp control vector")
@clear_errors
def export_gguf(file, out, model_hint, force):
    """Write FILE as a llama.cpp control vector (direction.N = output of block N = row N+1)."""
    art = load_vector(file)
    with atomic_files({out: CONTROL_VECTOR}, force=force) as tmps:
        art.to_control_vector(next(iter(tmps.values())), model_hint=model_hint)
    click.echo(f"wrote {out}")


@vectors.command("import")
@click.argument("file", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--model", "-m", default=None,
              help="The model the vector belongs to (folder, cached Hub id or alias): sizes a single "
                   "direction or a per-layer dict, checks a full table and is recorded.")
@click.option("--layer", "-l", type=int, default=None,
              help="Row of a single [hidden] direction (row L = output of block L-1).")
@click.option("--num-layers", type=int, default=None,
              help="Layer count of the model, for a .gguf (default: from --model).")
@click.option("--trait", default=None, help="Trait name to record in the metadata.")
@force_option("OUT if it is a previous vector file or per-checkpoint vectors folder")
@clear_errors
def import_(file, out, model, layer, num_layers, trait, force):
    """Convert FILE into a bakery .safetensors artifact OUT.

    FILE: a persona-vectors reference .pt table [layers+1, hidden]; a single direction .pt
    [hidden] (needs --layer and --model); a .pt dict of per-layer rows (needs --model); a
    llama.cpp control vector .gguf. A folder of per-checkpoint .pt files (step1000.pt, ...)
    becomes the folder OUT: one artifact per checkpoint and a checkpoints.json index."""
    from pathlib import Path

    from bakery.vectors.imports import import_checkpoint_folder, import_pt

    config = model_id = None
    if model is not None:
        from bakery.extraction.cache import model_id as resolve_model_id

        model_id, _, config = resolve_model_id(model)
    src = Path(file)
    if src.is_dir():
        arts = import_checkpoint_folder(src, out, config=config, model_id=model_id, layer=layer,
                                        trait=trait, force=force, log=lambda m: click.echo(m, err=True))
        first = next(iter(arts.values()))
        click.echo(f"wrote {out}: {len(arts)} checkpoint vector(s), {first.num_layers + 1} rows x "
                   f"{first.hidden_size} each, index {Path(out) / 'checkpoints.json'}")
        for name, art in arts.items():
            click.echo(f"  {name:<32} step {art.meta.get('step')!s:<10} |v| max row "
                       f"{max(art.norms()):.4f}")
        return
    if src.suffix.lower() in (".pt", ".pth"):
        art = import_pt(src, config=config, model_id=model_id, layer=layer, trait=trait)
    else:
        if layer is not None:
            raise click.UsageError("--layer places a single-direction .pt file; this file is not one")
        if num_layers is None and config is not None:
            from bakery.arch import num_layers_of

            num_layers = num_layers_of(config)
        art = load_vector(src, num_layers=num_layers)
        if config is not None:
            art.check_model(config)
            from bakery.vectors.imports import model_facts

            for k, v in model_facts(config, model_id).items():
                art.meta.setdefault(k, v)  # an extracted artifact's own record stays
        if trait:
            art.meta["trait"] = trait
    with atomic_files({out: VECTOR}, force=force) as tmps:
        art.save(next(iter(tmps.values())))
    click.echo(f"wrote {out} ({art.num_layers + 1} rows x {art.hidden_size})")
    if art.meta.get("single_direction"):
        L = art.meta["recommended_layer"]
        click.echo(f"single direction at {describe_layer(L)}; the other rows are zero. Use it with "
                   f"--layer {L}.")


COMMANDS = [vectors]
