"""``bakery extract``: a trait recipe in, a persona vector (three variants) out."""

from __future__ import annotations

from pathlib import Path

import click

from bakery.cli.common import clear_errors, force_option, model_option, trust_option, threads_option, device_options


@click.command()
@click.option("--recipe", "-r", required=False, help="Trait recipe: a built-in name (pirate) or a YAML file.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Main vector file (response_avg); default vectors/<trait>.safetensors. The other "
                   "variants, the answers (JSONL) and the per-layer plot go beside it. Existing "
                   "files are replaced only with --force.")
@click.option("--samples", type=int, default=1, show_default=True, help="Answers per (pair, question, side).")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-pairs", type=int, default=2, show_default=True,
              help="System-prompt pairs per held-out question for the AUC.")
@click.option("--batch-size", type=int, default=None,
              help="Answers generated at once (default: as many as fit the GPU's free memory; 40 on the CPU).")
@click.option("--capture", type=click.Choice(["single-pass", "two-pass"]), default="single-pass",
              show_default=True, help="single-pass reads activations during generation; two-pass "
                                      "is the reference (generate, then re-run each example).")
@click.option("--judge-model", default=None, help="Filter pairs with this OpenAI-compatible judge.")
@click.option("--base-url", default=None, help="Judge endpoint (default: OPENAI_BASE_URL or OpenAI). "
                                               "The key is read from OPENAI_API_KEY.")
@click.option("--judge-concurrency", type=int, default=8, show_default=True)
@click.option("--trait-threshold", type=float, default=50.0, show_default=True)
@click.option("--coherence-threshold", type=float, default=50.0, show_default=True)
@click.option("--min-pairs", type=int, default=5, show_default=True,
              help="Stop (no vector) when fewer pairs survive the judge.")
@threads_option
@force_option("the files of a previous extraction at --out")
@click.option("--no-cache", is_flag=True, help="Extract again even when the cache has this extraction.")
@click.option("--list", "list_", is_flag=True, help="List the cached vectors for --model and exit.")
@model_option
@trust_option
@device_options
@clear_errors
def extract(recipe, out, samples, max_new_tokens, temperature, top_p, seed, eval_pairs, batch_size,
            capture, judge_model, base_url, judge_concurrency, trait_threshold, coherence_threshold,
            min_pairs, force, no_cache, list_, model, trust_remote_code):
    """Extract a persona vector from a trait RECIPE on MODEL, with per-layer diagnostics."""
    from bakery.extraction import diagnostics
    from bakery.extraction.cache import list_cached, sibling_paths
    from bakery.extraction.extract import ExtractSettings, extract as run
    from bakery.traits import load_trait_recipe

    if list_:
        rows = list_cached(model)
        if not rows:
            click.echo(f"no cached vectors for {model}")
        for trait, path in rows:
            click.echo(f"{trait:<20} {path}")
        return
    if not recipe:
        raise click.UsageError("--recipe is required (a built-in name such as pirate, or a YAML file)")
    rec = load_trait_recipe(recipe)
    out = Path(out or Path("vectors") / f"{rec.name}.safetensors")
    settings = ExtractSettings(
        samples=samples, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, eval_pairs=eval_pairs, batch_size=batch_size, capture=capture,
        judge_model=judge_model, trait_threshold=trait_threshold,
        coherence_threshold=coherence_threshold, min_pairs=min_pairs)
    judge = None
    if judge_model:
        from bakery.extraction.judge import Judge

        judge = Judge(judge_model, base_url=base_url, concurrency=judge_concurrency, progress=True)
    art = run(rec, model, out=out, settings=settings, judge=judge, force=force, use_cache=not no_cache,
              trust_remote_code=trust_remote_code, log=lambda m: click.echo(m, err=True))
    meta = art.meta
    s = meta["samples"]
    click.echo(f"trait {meta['trait']} on {meta['model']}: {s['pairs_kept']} of {s['pairs_generated']} "
               f"pos/neg pairs, held-out {s['eval_pos']} pos / {s['eval_neg']} neg answers")
    click.echo(diagnostics.format_table(meta["layers"], meta["recommended_layer"]))
    paths = sibling_paths(out)
    click.echo(f"wrote {paths['response_avg']} (response_avg)")
    for k in ("prompt_avg", "prompt_last", "responses", "plot"):
        click.echo(f"      {paths[k]}")
    click.echo(f"use it: bakery steer --vector {out} --layer {meta['recommended_layer']} --coef 2 "
               f"\"How do I cook rice?\"   (sweep coefs: bakery sweep --trait {meta['trait']} ...)")


COMMANDS = [extract]
