"""``bakery push``: publish an export folder to the Hugging Face Hub."""

from __future__ import annotations

import click

from bakery.cli.common import clear_errors, echo_err


@click.command()
@click.argument("export", type=click.Path(file_okay=False))
@click.option("--repo", "repo_id", required=True, metavar="OWNER/NAME",
              help="Target model repo (NAME alone means your own namespace).")
@click.option("--private", is_flag=True, help="Create the repo private (only when it does not exist yet).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", default=None, metavar="TEXT",
              help="Commit title (default: what was baked, from bakery.json).")
@click.option("--endpoint", default=None, metavar="URL",
              help="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Push files that are not export content anyway (repeatable glob, e.g. 'notes/*').")
@click.option("--no-verify", is_flag=True, help="Skip `bakery verify --engine transformers` before upload.")
@click.option("--dry-run", is_flag=True, help="Check the folder and list what would be uploaded; send nothing.")
@click.option("--retries", type=int, default=4, show_default=True,
              help="Retries on transient Hub failures (5xx, 429, dropped connections), with backoff.")
@clear_errors
def push(export, repo_id, private, revision, create_pr, commit_message, endpoint, include, no_verify,
         dry_run, retries):
    """Publish the export folder EXPORT to the Hub in one commit and print the commit URL.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written."""
    from bakery import hub

    if dry_run:
        plan, manifest, meta = hub.prepare(export, include=include, verify=False, log=echo_err)
        target = f"{repo_id}@{revision or 'main'}" + (" (as a pull request)" if create_pr else "")
        click.echo(f"dry run: would push {len(plan.files)} files ({hub.human_size(plan.total_size)}) "
                   f"from {plan.export_dir} to {target}")
        click.echo(plan.table())
        click.echo(f"card: base_model {meta.get('base_model')} ({meta.get('base_model_relation')}), "
                   f"library {meta.get('library_name')}, license {meta.get('license')}, "
                   f"tags {', '.join(map(str, meta.get('tags') or []))}")
        if hub.card_for_repo(plan.export_dir, manifest, repo_id) is not None:
            click.echo(f"README.md goes up with its usage lines naming {repo_id} (the local card stays as it is)")
        if not no_verify:
            click.echo("not run in a dry run: bakery verify --engine transformers")
        return
    result = hub.push(export, repo_id, private=private, revision=revision, create_pr=create_pr,
                      commit_message=commit_message, endpoint=endpoint, include=include,
                      verify=not no_verify, retries=retries, log=echo_err)
    if result.changed:
        click.echo(f"pushed {len(result.files)} files to {result.repo_id}@{result.revision}")
    else:
        click.echo(f"nothing to push: {result.repo_id}@{result.revision} already holds these "
                   f"{len(result.files)} files")
    click.echo(f"commit: {result.commit_url}")
    if result.pr_url:
        click.echo(f"pull request: {result.pr_url}")


COMMANDS = [push]
