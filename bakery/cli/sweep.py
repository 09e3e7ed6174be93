"""``bakery sweep``: runtime steering over a (layer, coef) grid, with a suggested cell."""

from __future__ import annotations

from pathlib import Path

import click

from bakery.cli.common import clear_errors, force_option, model_option, threads_option, trust_option, device_options


@click.command()
@click.option("--vector", "-v", "vector_path", type=click.Path(dir_okay=False), default=None,
              help="Vector artifact (.safetensors, reference .pt, llama.cpp .gguf).")
@click.option("--trait", "-t", default=None, help="Use the cached vector of this trait (bakery extract).")
@click.option("--layers", "-l", required=True, help="Rows to try: A-B, A-B:STEP or A,B,C (row L = output of block L-1).")
@click.option("--coefs", "-c", default="1,2,4", show_default=True, help="Comma list of coefficients.")
@click.option("--recipe", "-r", default=None,
              help="Trait recipe for the judge rubric and the prompts (default: the vector's trait, if built in).")
@click.option("--prompt", "-p", "prompts", multiple=True, help="Prompt to answer (repeatable; default: "
              "the recipe's first --num-prompts eval questions).")
@click.option("--num-prompts", type=int, default=6, show_default=True)
@click.option("--max-new-tokens", type=int, default=40, show_default=True)
@click.option("--positions", type=click.Choice(["all", "prompt", "response"]), default="all", show_default=True)
@click.option("--judge-model", default=None, help="Score trait and coherence with this OpenAI-compatible judge.")
@click.option("--base-url", default=None, help="Judge endpoint; the key is read from OPENAI_API_KEY.")
@click.option("--coherence-threshold", type=float, default=50.0, show_default=True)
@click.option("--min-distinct", type=float, default=0.5, show_default=True,
              help="Without a judge: the least distinct-2 (bigram variety) every answer of a cell must have.")
@click.option("--max-kl", type=float, default=3.0, show_default=True,
              help="Without a judge: the largest KL(steered || base) per token a cell may have.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Folder for sweep.json and sweep.png (default: beside the vector, NAME.sweep/); "
              "it must be missing, empty, or a previous sweep's (with --force).")
@force_option("the output folder of a previous sweep")
@model_option
@trust_option
@threads_option
@device_options
@clear_errors
def sweep(vector_path, trait, layers, coefs, recipe, prompts, num_prompts, max_new_tokens, positions,
          judge_model, base_url, coherence_threshold, min_distinct, max_kl, out, force, model,
          trust_remote_code):
    """Steer at each (layer, coef) and measure projection, KL, and judge scores."""
    from bakery.extraction import sweep as sw
    from bakery.extraction.cache import resolve_trait
    from bakery.traits import available_traits, load_trait_recipe
    from bakery.io.folders import SWEEP, check_output
    from bakery.models import load_model, load_tokenizer, resolve_model
    from bakery.vectors.load import load_vector

    if bool(vector_path) == bool(trait):
        raise click.UsageError("give exactly one of --vector FILE or --trait NAME")
    if trait:
        vector_path = str(resolve_trait(trait, model))
    vp = Path(vector_path)
    folder = Path(out) if out else vp.with_name(vp.name.split(".")[0] + ".sweep")
    check_output(folder, kind=SWEEP, force=force)  # before the sweep, not after minutes of work
    path = resolve_model(model)
    lm = load_model(path, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    vec = load_vector(vector_path, num_layers=lm.config.num_hidden_layers)
    vec.check_model(lm.config)
    rec = None
    if recipe:
        rec = load_trait_recipe(recipe)
    elif vec.trait in available_traits():
        rec = load_trait_recipe(vec.trait)
    if judge_model and rec is None:
        raise click.UsageError(f"--judge-model needs the trait's rubric: pass --recipe (no built-in "
                               f"recipe is named '{vec.trait}')")
    plist = list(prompts) or (rec.eval_questions[:num_prompts] if rec else list(sw.DEFAULT_PROMPTS[:num_prompts]))
    judge = None
    if judge_model:
        from bakery.extraction.judge import Judge

        judge = Judge(judge_model, base_url=base_url, progress=True)
        judge.ping()
    res = sw.sweep(vec, lm, tok, sw.parse_layers(layers, vec.num_layers), sw.parse_coefs(coefs),
                   prompts=plist, max_new_tokens=max_new_tokens, judge=judge,
                   rubric=rec.judge_rubric if rec else None, coherence_threshold=coherence_threshold,
                   min_distinct=min_distinct, max_kl=max_kl, positions=positions)
    files = sw.save(res, folder, title=f"{vec.trait}: steering sweep", force=force)
    click.echo(sw.format_table(res))
    if res.suggested:
        L, c = res.suggested
        cell = next(x for x in res.cells if (x.layer, x.coef) == (L, c))
        click.echo(f"\n> {plist[0]}\nunsteered: {res.base_answers[0]}\nsteered:   {cell.answers[0]}")
    click.echo(f"wrote {files['json']} and {files['plot']}")


COMMANDS = [sweep]
