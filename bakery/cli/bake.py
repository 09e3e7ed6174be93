"""``bakery bake``: write a steering vector into a copy of a model's weights."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click

from bakery.arch import auto_class
from bakery.cli.common import clear_errors, force_option, echo_err, threads_option, device_options
from bakery.naming import describe_layer


def _parse_size(text: str | None) -> int | None:
    if not text:
        return None
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "KI": 1024, "MI": 1024**2, "GI": 1024**3}
    for suf in sorted(mult, key=len, reverse=True):
        if t.endswith(suf):
            return int(float(t[: -len(suf)]) * mult[suf])
    return int(float(t))


def _config_flags(f):
    """The flags of every method's typed config, each one's help naming the methods that take it."""
    from bakery.bakers import config_classes

    flags: dict[str, tuple] = {}
    for method, cls in config_classes().items():
        for fld in cls.options():
            flag = fld.metadata.get("flag")
            if flag:
                entry = flags.setdefault(flag, (fld, [], set()))
                entry[1].append(method)
                entry[2].update(fld.metadata.get("choices") or ())
    for flag, (fld, methods, choices) in reversed(flags.items()):
        m = fld.metadata
        text = f"[{', '.join(methods)}] {m['help']}"
        if m.get("is_flag"):
            f = click.option(flag, fld.name, is_flag=True, default=None, help=text)(f)
        else:
            kind = click.Choice(sorted(choices)) if choices else {int: int, float: float}.get(m.get("kind"), str)
            f = click.option(flag, fld.name, type=kind, default=None, help=text)(f)
    return f


@click.command()
@click.option("--recipe", "-r", default=None, help="Bake recipe YAML (or a built-in name: pirate-bias, pirate-rank1, ...); flags override it.")
@click.option("--method", type=click.Choice(["bias", "ortho", "kl-lora", "kl-full"]), default=None,
              help="bias: constant steering (exact where the route exists); ortho: directional ablation; "
              "kl-lora / kl-full: distillation of runtime steering (approximate).")
@click.option("--vector", "-v", "vector_path", default=None, type=click.Path(dir_okay=False),
              help="Vector artifact (.safetensors, reference .pt or llama.cpp .gguf).")
@click.option("--trait", "-t", default=None, help="Use the vector extracted for this trait recipe (extraction cache).")
@click.option("--layer", "-l", type=int, default=None, help="Row L of the vector: the output of block L-1.")
@click.option("--coef", "-c", type=float, default=None,
              help="[bias, kl-lora, kl-full] Steering strength: the bake stands for adding coef * v[L].")
@click.option("--model", "-m", default=None, help="Model folder, cached Hub id or alias (default: the recipe's, "
              "$BAKERY_MODEL, or smollm2-135m-instruct).")
@click.option("--output", "-o", default=None, help="Export folder (default: a descriptive folder under exports/).")
@force_option("a previous export at --output")
@click.option("--shard-size", default=None, help="Largest output shard, e.g. 2GB (default 2GiB).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any setting of the method's config that has no flag, e.g. --set num_prompts=200 "
              "--set lr=1e-4 for kl-lora, --set ridge=0.1 for --route rank1 (repeatable; the card's "
              "Settings table lists them).")
@_config_flags
@threads_option
@device_options(auto_dtype="float32", dtype_help="float32 (the rank-one fit and the distillation's model)")
@clear_errors
def bake(recipe, method, vector_path, trait, layer, coef, model, output, force, shard_size, settings,
         **flags):
    """Bake a steering vector into a copy of a model: no hooks needed at inference.

    Each method takes only its own options (the [methods] in front of each help line); any
    other is refused.

    \b
    Examples:
      bakery bake --method bias --vector V --layer 16 --coef 2 -o exports/pirate
      bakery bake --method ortho --layer 22 --trait pirate
      bakery bake --method kl-lora -v V -l 17 -c 2 --steps 100 --set num_prompts=200
      bakery bake --recipe pirate-bias --coef 3
    """
    from bakery.bakers import bake as run_bake
    from bakery.bakers import coef_message, get_baker, make_config
    from bakery.bakers.recipes import TermSpec, load_bake_recipe, no_vector_error, vector_for_trait

    rec = load_bake_recipe(recipe) if recipe else None
    model = model or (rec.model if rec else None) or os.environ.get("BAKERY_MODEL") or None
    method = method or (rec.method if rec else None)
    if method is None:
        raise click.UsageError("give --method bias|ortho|kl-lora|kl-full (or --recipe FILE)")
    baker = get_baker(method)
    if coef is not None and not baker.uses_coef:
        raise click.UsageError(coef_message(method, False))
    terms = list(rec.terms) if rec else []
    term_flags = {k: v for k, v in dict(vector=vector_path, trait=trait, layer=layer, coef=coef).items()
                  if v is not None}
    if term_flags:
        if len(terms) > 1:
            raise click.UsageError(f"the recipe has {len(terms)} terms; --vector/--trait/--layer/--coef "
                                   "override a single-term recipe only. Edit the recipe instead.")
        base = terms[0] if terms else TermSpec(layer=-1)
        if "vector" in term_flags or "trait" in term_flags:
            base.vector, base.trait = vector_path, trait
        terms = [TermSpec(layer=layer if layer is not None else base.layer,
                          coef=coef if coef is not None else base.coef,
                          trait=base.trait, vector=base.vector)]
    if not terms or all(t.vector is None and t.trait is None for t in terms):
        raise no_vector_error(model)
    resolved = []
    for i, t in enumerate(terms):
        if t.layer is None or t.layer < 0:
            raise click.UsageError("give --layer L (row L of the vector: the output of block L-1)")
        if (t.coef is None) == baker.uses_coef:
            where = (f"recipe {rec.source}" + (f", term {i}" if len(terms) > 1 else "")
                     + (" has no coef" if baker.uses_coef else " gives a coef") if rec and coef is None else "")
            raise click.UsageError(coef_message(method, baker.uses_coef, where))
        vec = t.vector or str(vector_for_trait(t.trait, model))
        resolved.append((vec, t.layer, t.coef, t.trait))
    options = dict(rec.options) if rec else {}
    options.update({k: v for k, v in flags.items() if v is not None})
    options.update(_parse_settings(settings))
    cfg = make_config(method, options)
    out = run_bake(method, model, resolved, output or (rec.output if rec else None), force=force,
                   max_shard_bytes=_parse_size(shard_size), config=cfg)
    if out is not None:  # None: a non-main process of a distributed run
        _print_summary(out)


def _parse_settings(settings: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs; values are read as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.UsageError(f"--set takes KEY=VALUE; got '{item}'")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _NUMBER.fullmatch(parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads 1e-4 (no dot) as a string
        out[key.strip().replace("-", "_")] = parsed
    return out


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _print_summary(out) -> None:
    from bakery.io.manifest import Manifest

    m = Manifest.load(out)
    click.secho(f"baked {out}", fg="green", bold=True)
    claim = ("exact by construction (not yet measured: bakery compare)" if m.exact
             else "approximate (measure it: bakery compare)")
    click.echo(f"  method {m.method}, route {m.route}, site {m.site}, {claim}")
    for t in m.terms:
        coef_txt = f", coef {t.coef:g}" if t.coef is not None else ""
        where = (f"row {t.layer} added after the attention of block {t.layer}" if m.site == "attn-out"
                 else describe_layer(t.layer))
        click.echo(f"  {t.trait}: {where}{coef_txt}")
    click.echo("  engines, rules only (not run; bakery verify runs them): "
               + ", ".join(f"{e} {v}" for e, v in m.engines.items()))
    for n in m.extra.get("notes", []):
        click.echo(f"  note: {n}")
    for w in m.extra.get("warnings", []):
        echo_err(click.style(f"  warning: {w}", fg="yellow"))
    auto = auto_class(json.loads((Path(out) / "config.json").read_text()))
    click.echo(f"  load: {auto}.from_pretrained('{out}')  |  vllm serve {out}")


COMMANDS = [bake]
