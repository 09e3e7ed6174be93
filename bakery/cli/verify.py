"""``bakery verify``: reload each export in the serving engines and check the edit survived."""

from __future__ import annotations

import sys

import click

from bakery.cli.common import clear_errors, echo_err, threads_option, device_options


@click.command()
@click.argument("exports", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--engine", "-e", "engines", default="all", show_default=True,
              help="transformers, vllm, sglang, llama.cpp (for a `bakery gguf` folder), all, or a "
                   "comma-separated list.")
@click.option("--model", "-m", default=None,
              help="The untouched base model (default: the source recorded in the manifest).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="Held-out prompts (text, JSON list or trait recipe YAML).")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
@click.option("--no-write", is_flag=True, help="Leave the exports untouched.")
@threads_option
@device_options(auto_dtype="float32",
                dtype_help="float32 on every device (the exactness rule is a float32 rule)")
@clear_errors
def verify(exports, engines, model, prompts_file, max_new_tokens, as_json, no_write):
    """Check that each EXPORT loads with its edit intact: transformers (strict reload, runtime
    match; an exact bake must reproduce runtime steering to float rounding), vLLM and sglang (real
    runs, teacher-forced against transformers; sglang natively and with --model-impl
    transformers), and, for a `bakery gguf` folder, llama.cpp (against llama.cpp's own control
    vector and transformers). An engine that is not installed falls back to "not installed"
    (sglang: its loading rules, "rules only (not run)"); neither is a pass.

    Exit status 0 when every export passed at least one real run and nothing failed; 1 when any
    verdict fails (a run, or a rule violation); 3 when nothing failed but an export had no real run
    (a rules-only verdict or a missing engine is no pass); 2 on bad input or a named --engine that is
    not installed (under --engine all a missing engine is reported, not an error).
    """
    from bakery.engines.verify import exit_status, verdicts_json, verdicts_markdown, verify as run

    out = run(list(exports), engines, model=model, prompts=prompts_file, max_new_tokens=max_new_tokens,
              write=not no_write, log=echo_err)
    if as_json:
        click.echo(verdicts_json(out))
    for export, verdicts in out.items():
        if not as_json:
            click.secho(f"\n{export}", bold=True)
            click.echo(verdicts_markdown(verdicts))
        for v in verdicts:
            if v.failed:
                echo_err(f"FAIL {export} [{v.engine}]: {v.message}")
            elif not v.ran:
                echo_err(f"NOT RUN {export} [{v.engine}]: {v.message}")
    code = exit_status(out)
    if code == 3:
        echo_err("nothing failed, but not every export passed a real run (rules-only and not-installed "
                 "verdicts are no pass): exit status 3")
    sys.exit(code)


COMMANDS = [verify]
