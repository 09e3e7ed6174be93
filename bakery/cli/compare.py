"""``bakery compare``: each bake measured against the runtime steering it stands for."""

from __future__ import annotations

import click

from bakery.cli.common import clear_errors, echo_err, threads_option, device_options


@click.command()
@click.argument("exports", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--vector", "-v", "vector_path", type=click.Path(dir_okay=False),
              help="Vector artifact (default: the one recorded in each export's bakery.json).")
@click.option("--layer", "-l", type=int, help="Row L of the vector: output of block L-1 (default: manifest).")
@click.option("--coef", "-c", type=float, help="Steering strength (default: manifest).")
@click.option("--positions", type=click.Choice(["all", "prompt", "response"]),
              help="Positions the reference steers (default: manifest).")
@click.option("--model", "-m", default=None,
              help="The untouched base model (default: the source recorded in the manifest).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="Held-out prompts: text (one per line), JSON list, or a trait recipe YAML "
                   "(its eval questions). Default: the trait recipe's eval questions, else built-in ones.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True,
              help="Length of the sampled steered trajectories.")
@click.option("--greedy-tokens", type=int, default=32, show_default=True,
              help="N for greedy-continuation agreement.")
@click.option("--judge-model", default=None, help="Also judge trait and coherence with this model.")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint of the judge (default: OpenAI).")
@click.option("--judge-concurrency", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Prompts run at once (default: as many as fit the GPU's free memory; 8 on the CPU).")
@click.option("--no-write", is_flag=True, help="Print only; leave the exports untouched.")
@threads_option
@device_options(auto_dtype="float32",
                dtype_help="float32 on every device (the exactness rule is a float32 rule)")
@clear_errors
def compare(exports, vector_path, layer, coef, positions, model, prompts_file, max_new_tokens, greedy_tokens,
            judge_model, base_url, judge_concurrency, seed, batch_size, no_write):
    """Fidelity of each EXPORT to runtime steering: KL, recovered effect R, top-1 and greedy
    agreement, projection onto the vector, neutral drift (and judge scores with --judge-model),
    and whether each bake is exact (KL within float rounding and R >= 0.9999). A bake of several
    terms is measured against the same multi-term runtime steering.

    Writes compare/report.json, report.md and fidelity.png into each export and the fidelity
    table into its model card.
    """
    from bakery.fidelity.compare import compare as run
    from bakery.fidelity.report import markdown_report

    given = [x is not None for x in (vector_path, layer, coef)]
    if any(given) and vector_path is not None and not all(given):
        raise click.UsageError("with --vector, give --layer and --coef too")
    judge = None
    if judge_model:
        from bakery.extraction.judge import Judge

        judge = Judge(judge_model, base_url=base_url, concurrency=judge_concurrency)
    reports = run(list(exports), model=model, vector=vector_path, layer=layer, coef=coef, positions=positions,
                  prompts=prompts_file, max_new_tokens=max_new_tokens, greedy_tokens=greedy_tokens,
                  judge=judge, write=not no_write, seed=seed, log=echo_err, batch_size=batch_size)
    for r in reports:
        click.echo(markdown_report(r))
        for name, path in r["candidates"].items():
            if not no_write:
                echo_err(f"[bakery] {name}: wrote {path}/compare/ and the fidelity section of its README.md")


COMMANDS = [compare]
