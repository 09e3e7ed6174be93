"""``bakery bake``: write a steering vector into a copy of a model's weights."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click

from bakery.cli.common import clear_errors, echo_err, threads_option
from bakery.vectors.artifact import describe_layer


def _command_line(ctx: click.Context) -> str:
    """The command as typed (flags in declaration order): recorded in the manifest and the card.

    It must read back as the same bake: a repeatable option is written once per value (none when
    it was not given), a flag only when set, and a float in a form that parses to the same number.
    """
    from bakery.bakers import fmt_float

    def text(v) -> str:
        return fmt_float(v) if isinstance(v, float) else str(v)

    args = ["bakery", ctx.info_name or "bake"]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v is None or v is False or not isinstance(p, click.Option):
            continue
        flag = max(p.opts, key=len)
        if p.multiple:
            for item in v or ():
                args += [flag, text(item)]
        elif p.is_flag and v is True:
            args += [flag]
        else:
            args += [flag, text(v)]
    return shlex.join(args)


def _parse_size(text: str | None) -> int | None:
    if not text:
        return None
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "KI": 1024, "MI": 1024**2, "GI": 1024**3}
    for suf in sorted(mult, key=len, reverse=True):
        if t.endswith(suf):
            return int(float(t[: -len(suf)]) * mult[suf])
    return int(float(t))


@click.command()
@click.option("--recipe", "-r", default=None, help="Bake recipe YAML (or a name in recipes/bakes/); flags override it.")
@click.option("--method", type=click.Choice(["bias", "ortho", "kl-lora", "kl-full"]), default=None,
              help="bias: constant steering (exact where the route exists); ortho: directional ablation.")
@click.option("--vector", "-v", "vector_path", default=None, type=click.Path(dir_okay=False),
              help="Vector artifact (.safetensors, reference .pt or llama.cpp .gguf).")
@click.option("--trait", "-t", default=None, help="Use the vector extracted for this trait recipe (extraction cache).")
@click.option("--layer", "-l", type=int, default=None, help="Row L of the vector: the output of block L-1.")
@click.option("--coef", "-c", type=float, default=None, help="Steering strength (bias): adds coef * v[L].")
@click.option("--route", type=click.Choice(["bias", "rank1"]), default=None,
              help="bias: exact bias (default); rank1: approximate rank-one weight update, any architecture.")
@click.option("--site", type=click.Choice(["resid-out", "attn-out"]), default=None,
              help="resid-out: output of block L-1 (default); attn-out: after the attention of block L.")
@click.option("--target-engine", "target_engines", default=None,
              help="Comma-separated: transformers, vllm, sglang (default: all three); sglang-native "
                   "refuses routes that need an sglang launch flag.")
@click.option("--embeddings", type=click.Choice(["ablate", "keep"]), default=None,
              help="ortho: ablate the embedding output too (tied embeddings get untied) or keep it.")
@click.option("--blocks", default=None, help="ortho: blocks to ablate, e.g. 10-20 or 3,5,7 (0-based; default all).")
@click.option("--per-layer", is_flag=True, default=None, help="ortho: block i uses direction v[i+1].")
@click.option("--add", type=float, default=None, help="ortho: re-add ADD * r at the output of block L-1 (affine edit).")
@click.option("--calibration", type=click.Choice(["generate", "prompts"]), default=None,
              help="rank1: fit on steered sample answers (default) or on the prompts only (faster).")
@click.option("--model", "-m", default=None, help="Model folder, cached Hub id or alias (default: the recipe's, "
              "$BAKERY_MODEL, or smollm2-135m-instruct).")
@click.option("--output", "-o", default=None, help="Export folder (default: a descriptive folder under exports/).")
@click.option("--force", is_flag=True, help="Replace an existing export folder.")
@click.option("--shard-size", default=None, help="Largest output shard, e.g. 2GB (default 2GiB).")
@click.option("--positions", type=click.Choice(["response", "all"]), default=None,
              help="kl-lora/kl-full (default response) and --route rank1 (default all): the positions "
              "the steering being baked applies to.")
@click.option("--steps", type=int, default=None, help="kl-lora/kl-full: training steps (default 100).")
@click.option("--rank", type=int, default=None, help="kl-lora: LoRA rank (default 32).")
@click.option("--teacher-engine", type=click.Choice(["transformers", "vllm"]), default=None,
              help="kl-lora/kl-full with --positions all: vllm samples the teacher's trajectories "
              "from the exact bias bake in vLLM (for GPU hosts: on 2 CPU cores it measured slower "
              "than hooked generation).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="kl-lora/kl-full: any other distillation setting, e.g. --set num_prompts=200 "
              "--set lr=1e-4 (repeatable; see python -m bakery.bakers.distill.pipeline --help).")
@threads_option
@clear_errors
def bake(recipe, method, vector_path, trait, layer, coef, route, site, target_engines, embeddings,
         blocks, per_layer, add, calibration, model, output, force, shard_size, positions, steps,
         rank, teacher_engine, settings):
    """Bake a steering vector into a copy of a model: no hooks needed at inference.

    \b
    Examples:
      bakery bake --method bias --vector V --layer 16 --coef 2 -o exports/pirate
      bakery bake --method ortho --layer 22 --trait pirate
      bakery bake --recipe recipes/bakes/pirate-bias.yaml --coef 3
    """
    from bakery.bakers.recipes import (BakeRecipeError, TermSpec, load_bake_recipe, no_vector_error,
                                     vector_for_trait)
    from bakery.bakers import bake as run_bake
    from bakery.bakers import coef_required_message, get_baker

    rec = load_bake_recipe(recipe) if recipe else None
    model = model or (rec.model if rec else None) or os.environ.get("BAKERY_MODEL") or None
    method = method or (rec.method if rec else None)
    if method is None:
        raise click.UsageError("give --method bias|ortho|kl-lora|kl-full (or --recipe FILE)")
    terms = list(rec.terms) if rec else []
    term_flags = {k: v for k, v in dict(vector=vector_path, trait=trait, layer=layer, coef=coef).items()
                  if v is not None}
    if term_flags:
        if len(terms) > 1:
            raise BakeRecipeError(f"the recipe has {len(terms)} terms; --vector/--trait/--layer/--coef "
                                  "override a single-term recipe only. Edit the recipe instead.")
        base = terms[0] if terms else TermSpec(layer=-1)
        if "vector" in term_flags or "trait" in term_flags:
            base.vector, base.trait = vector_path, trait
        terms = [TermSpec(layer=layer if layer is not None else base.layer,
                          coef=coef if coef is not None else base.coef,
                          trait=base.trait, vector=base.vector)]
    if not terms or all(t.vector is None and t.trait is None for t in terms):
        raise no_vector_error(model)
    needs_coef = getattr(get_baker(method), "needs_coef", True)
    the_route = (route or (rec.route if rec else None)) if method == "bias" else None
    resolved = []
    for i, t in enumerate(terms):
        if t.layer is None or t.layer < 0:
            raise click.UsageError("give --layer L (row L of the vector: the output of block L-1)")
        if needs_coef and t.coef is None:
            where = (f"recipe {rec.source}" + (f", term {i}" if len(terms) > 1 else "") + " has no coef"
                     if rec and coef is None else "")
            raise click.UsageError(coef_required_message(method, the_route, where))
        vec = t.vector or str(vector_for_trait(t.trait, model))
        resolved.append((vec, t.layer, t.coef, t.trait))
    opts = dict(rec.options) if rec else {}
    for k, v in dict(embeddings=embeddings, blocks=blocks, per_layer=per_layer, add=add,
                     calibration=calibration, positions=positions, steps=steps, rank=rank,
                     teacher_engine=teacher_engine).items():
        if v is not None:
            opts[k] = v
    opts.update(_parse_settings(settings))
    if method in ("kl-lora", "kl-full"):
        out = _bake_distilled(method, model, resolved, output or (rec.output if rec else None),
                              force, opts)
        _print_summary(out)
        return
    elif steps or rank or teacher_engine or settings:
        raise click.UsageError("--steps, --rank, --teacher-engine and --set are for --method kl-lora/kl-full")
    elif positions and (route or (rec.route if rec else None)) != "rank1":
        raise click.UsageError("--positions is for --route rank1 (a gated rank-one edit) and --method "
                               "kl-lora/kl-full; a bias adds at every position")
    out = run_bake(
        method, model, resolved, output or (rec.output if rec else None),
        route=route or (rec.route if rec else None) or "bias",
        site=site or (rec.site if rec else None) or "resid-out",
        target_engines=target_engines or (rec.target_engines if rec else None),
        force=force, command=_command_line(click.get_current_context()),
        max_shard_bytes=_parse_size(shard_size), **opts)
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


def _bake_distilled(method: str, model, resolved: list, output, force: bool, opts: dict) -> Path:
    """kl-lora / kl-full: train against the steered teacher, export merged weights + adapter/."""
    from bakery.bakers import bake as run_bake

    if len(resolved) != 1:
        raise click.UsageError(f"{method} distils one (vector, layer, coef) term; got {len(resolved)}")
    return run_bake(method, model, resolved, output, force=force,
                    command=_command_line(click.get_current_context()), **opts)


def _print_summary(out) -> None:
    from bakery.io.manifest import Manifest

    m = Manifest.load(out)
    click.secho(f"baked {out}", fg="green", bold=True)
    click.echo(f"  method {m.method}, route {m.route}, site {m.site}, exact {str(m.exact).lower()}")
    for t in m.terms:
        coef_txt = f", coef {t.coef:g}" if m.method != "ortho" else ""
        where = (f"row {t.layer} added after the attention of block {t.layer}" if m.site == "attn-out"
                 else describe_layer(t.layer))
        click.echo(f"  {t.trait}: {where}{coef_txt}")
    click.echo("  engines: " + ", ".join(f"{e} {v}" for e, v in m.engines.items()))
    for n in m.extra.get("notes", []):
        click.echo(f"  note: {n}")
    for w in m.extra.get("warnings", []):
        echo_err(click.style(f"  warning: {w}", fg="yellow"))
    click.echo(f"  load: AutoModelForCausalLM.from_pretrained('{out}')  |  vllm serve {out}")


COMMANDS = [bake]
