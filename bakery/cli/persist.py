"""``bakery persist``: does a persona outlast the steering?"""

from __future__ import annotations

import click

from bakery.cli.common import clear_errors, force_option, echo_err, model_option, trust_option, threads_option, device_options


@click.command()
@click.option("--vector", "-v", "vector_path", required=True, type=click.Path(dir_okay=False),
              help="Vector artifact (.safetensors, reference .pt or llama.cpp .gguf).")
@click.option("--layer", "-l", type=int, required=True, help="Row L of the artifact: output of block L-1.")
@click.option("--coef", "-c", type=float, required=True, help="Steering strength: adds coef * v[L].")
@click.option("--steer-tokens", "-n", type=int, required=True, help="N: tokens generated with steering on.")
@click.option("--sample-tokens", "-k", type=int, required=True,
              help="M: tokens generated afterwards from the same KV cache, steering off.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="Prompts, one per line (# comments), a JSON/YAML list, or JSON lines.")
@click.option("--recipe", default=None, help="A trait recipe (YAML path or name): its eval questions.")
@click.option("--prompt", "prompt_texts", multiple=True, help="A prompt (repeatable).")
@click.option("--export", "export", default=None, type=click.Path(file_okay=False),
              help="A baked checkpoint folder: its own trace (plain transformers, no hook) is added.")
@click.option("--temperature", "-t", type=float, default=0.7, show_default=True, help="0 is greedy.")
@click.option("--seed", "seeds", type=int, multiple=True,
              help="Sampling seed (repeatable: each seed is one more trace per prompt). Default 0.")
@click.option("--suppress-eos/--allow-eos", default=True, show_default=True,
              help="Forbid end of sequence while measuring, so every trace has N+M tokens.")
@click.option("--system", default=None, help="Optional system prompt.")
@click.option("--batch-size", type=int, default=None,
              help="Prompts traced at once (default: as many as fit the GPU's free memory; 8 on the CPU).")
@click.option("--output", "-o", "outdir", required=True, type=click.Path(file_okay=False),
              help="Output folder: traces.json/.csv, texts.md, summary.json, persist.png.")
@force_option("a previous persist output folder")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@threads_option
@model_option
@trust_option
@device_options
@clear_errors
def persist(vector_path, layer, coef, steer_tokens, sample_tokens, prompts_file, recipe, prompt_texts,
            export, temperature, seeds, suppress_eos, system, batch_size, outdir, force, quiet,
            model, trust_remote_code):
    """Steer N tokens, continue M tokens without steering, and record (h.v)/|v| at the layer for
    every generated token, next to the unsteered and the steered-throughout references (and a
    baked checkpoint's own trace with --export). Prompts default to a few built-in questions."""
    from bakery.traits import read_prompts
    from bakery.fidelity.persist import (DEFAULT_PROMPTS, PersistSettings, format_summary, recipe_questions,
                                         run_persist, write_outputs)
    from bakery.io.folders import PERSIST, check_output

    given = [x for x in (prompts_file, recipe, prompt_texts or None) if x]
    if len(given) > 1:
        raise click.UsageError("give one of --prompts FILE, --recipe R or --prompt TEXT")
    out = check_output(outdir, kind=PERSIST, force=force)  # before minutes of tracing
    if prompts_file:
        prompts = read_prompts(prompts_file)
    elif recipe:
        prompts = recipe_questions(recipe)
    else:
        prompts = list(prompt_texts) or list(DEFAULT_PROMPTS)
    settings = PersistSettings(layer=layer, coef=coef, steer_tokens=steer_tokens,
                               sample_tokens=sample_tokens, temperature=temperature,
                               seeds=tuple(seeds) or (0,), suppress_eos=suppress_eos, system=system,
                               batch_size=batch_size)
    settings.validate()
    if temperature == 0 and len(settings.seeds) > 1:
        echo_err("note: --temperature 0 is greedy, so every seed gives the same trace")
    result = run_persist(prompts, settings, vector_path=vector_path, model=model, export=export,
                         trust_remote_code=trust_remote_code, progress=not quiet)
    written = write_outputs(result, out, force=force)
    click.echo(format_summary(result.summary))
    click.echo(f"wrote {written}/ (traces.json, traces.csv, texts.md, summary.json, persist.png)")


COMMANDS = [persist]
