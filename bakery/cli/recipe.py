"""``bakery recipe``: list, check, generate and import trait recipes."""

from __future__ import annotations

import click

from bakery.cli.common import clear_errors, force_option


@click.group()
def recipe():
    """Trait recipes: contrastive system prompts, questions and a judge rubric."""


@recipe.command("list")
@clear_errors
def list_():
    """The built-in trait recipes (bakery/recipes/traits/)."""
    from bakery.traits import available_traits, load_trait_recipe

    for name in available_traits():
        r = load_trait_recipe(name)
        click.echo(f"{name:<16} {len(r.pairs)} pairs, {len(r.extract_questions)}+{len(r.eval_questions)} "
                   f"questions  {r.description[:70]}...")


@recipe.command()
@click.argument("recipes", nargs=-1, required=True)
@clear_errors
def check(recipes):
    """Check RECIPES (names or YAML files) against the schema."""
    from bakery.traits import load_trait_recipe

    for r in recipes:
        rec = load_trait_recipe(r)
        click.echo(f"ok: {rec.source} ({rec.name}: {len(rec.pairs)} pairs, "
                   f"{len(rec.extract_questions)} extract + {len(rec.eval_questions)} eval questions)")


@recipe.command()
@click.option("--trait", "-t", required=True, help="Trait name (lowercase, names the files).")
@click.option("--description", "-d", required=True, help="What the trait is, in a sentence or two.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="YAML file to write.")
@click.option("--judge-model", required=True, help="OpenAI-compatible model that writes the recipe.")
@click.option("--base-url", default=None, help="Endpoint (default: OPENAI_BASE_URL or OpenAI). "
                                               "The key is read from OPENAI_API_KEY.")
@click.option("--retries", type=int, default=3, show_default=True, help="Re-asks after a malformed answer.")
@force_option("--out if it is a trait recipe")
@clear_errors
def new(trait, description, out, judge_model, base_url, retries, force):
    """Generate a trait recipe with a model, validate it and write it as YAML."""
    from bakery.extraction.recipe_gen import generate_recipe, write_recipe
    from bakery.io.folders import TRAIT_RECIPE, check_output

    check_output(out, kind=TRAIT_RECIPE, force=force)  # before asking the model
    rec = generate_recipe(trait, description, model=judge_model, base_url=base_url, retries=retries,
                          log=lambda m: click.echo(m, err=True))
    path = write_recipe(rec, out, force=force)
    click.echo(f"wrote {path}: {len(rec.pairs)} pairs, {len(rec.extract_questions)} extract + "
               f"{len(rec.eval_questions)} eval questions")
    click.echo(f"next: bakery extract --recipe {path}")


@recipe.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="YAML file to write.")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), default=None,
              help="Held-out questions: the reference's trait_data_eval/<trait>.json (found beside "
                   "trait_data_extract/ by default; without one, half the questions are held out).")
@click.option("--trait", "-t", default=None, help="Trait name (default: the file name).")
@click.option("--description", "-d", default=None,
              help="What the trait is (default: a line naming the source).")
@force_option("--out if it is a trait recipe")
@clear_errors
def import_(path, out, eval_path, trait, description, force):
    """Convert persona-vectors trait data (JSON: instruction, questions, eval_prompt) into a trait recipe."""
    from bakery.extraction.recipe_gen import write_recipe
    from bakery.extraction.recipe_import import import_persona_vectors
    from bakery.io.folders import TRAIT_RECIPE, check_output

    check_output(out, kind=TRAIT_RECIPE, force=force)
    got = import_persona_vectors(path, eval_path=eval_path, name=trait, description=description)
    for note in got.notes:
        click.echo(f"note: {note}", err=True)
    rec = got.recipe
    written = write_recipe(rec, out, force=force)
    held = f" (held out from {got.eval_file})" if got.eval_file else ""
    click.echo(f"wrote {written}: {rec.name}, {len(rec.pairs)} pairs, {len(rec.extract_questions)} "
               f"extract + {len(rec.eval_questions)} eval questions{held}")
    click.echo(f"next: bakery extract --recipe {written}")


COMMANDS = [recipe]
