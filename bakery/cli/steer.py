"""``bakery steer``: unsteered and steered answers side by side."""

from __future__ import annotations

import shutil
import textwrap

import click

from bakery.cli.common import clear_errors, model_option, threads_option, trust_option, device_options
from bakery.naming import describe_layer


@click.command()
@click.argument("prompts", nargs=-1, required=True)
@click.option("--vector", "-v", "vector_path", default=None, type=click.Path(dir_okay=False),
              help="Vector artifact (.safetensors, reference .pt or llama.cpp .gguf).")
@click.option("--trait", "-t", default=None,
              help="Instead of --vector: the vector `bakery extract` cached for this trait and model.")
@click.option("--layer", "-l", type=int, required=True, help="Row L of the artifact: output of block L-1.")
@click.option("--coef", "-c", type=float, required=True, help="Steering strength: adds coef * v[L].")
@click.option("--positions", type=click.Choice(["all", "prompt", "response"]), default="all", show_default=True)
@click.option("--max-new-tokens", type=int, default=60, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--system", default=None, help="Optional system prompt.")
@model_option
@trust_option
@threads_option
@device_options
@clear_errors
def steer(prompts, vector_path, trait, layer, coef, positions, max_new_tokens, temperature, system, model,
          trust_remote_code):
    """Print the unsteered and the steered answer to each PROMPT (chat template applied)."""
    from bakery.steering.side_by_side import steer_compare

    if (vector_path is None) == (trait is None):
        raise click.UsageError("give exactly one of --vector FILE or --trait NAME")
    if trait is not None:
        from bakery.extraction.cache import resolve_trait

        vector_path = resolve_trait(trait, model)
    rows = steer_compare(list(prompts), vector_path=vector_path, layer=layer, coef=coef,
                         positions=positions, model=model, max_new_tokens=max_new_tokens,
                         temperature=temperature, system=system, trust_remote_code=trust_remote_code)
    width = max(40, min(shutil.get_terminal_size((120, 20)).columns, 160) // 2 - 2)
    click.echo(f"{describe_layer(layer)}, coef {coef:g}, positions {positions}")
    for prompt, base, steered in rows:
        click.secho(f"\n> {prompt}", bold=True)
        left = textwrap.wrap(base, width) or [""]
        right = textwrap.wrap(steered, width) or [""]
        click.echo(f"{'unsteered':<{width}} | steered (coef {coef:g})")
        click.echo(f"{'-' * width}-+-{'-' * width}")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            click.echo(f"{a:<{width}} | {b}")


COMMANDS = [steer]
