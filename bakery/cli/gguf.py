"""``bakery gguf``: a GGUF of a bake, for llama.cpp and ollama."""

from __future__ import annotations

import json

import click

from bakery.cli.common import clear_errors, force_option
from bakery.gguf.convert import OUTTYPES


@click.command("gguf")
@click.argument("export", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="The new folder to write.")
@click.option("--from-gguf", "from_gguf", type=click.Path(dir_okay=False), default=None,
              help="Apply the bake to this GGUF of the base model (quantized or not): bias and ortho bakes.")
@click.option("--outtype", type=click.Choice(OUTTYPES), default=None,
              help="Conversion path only: the converter's output type (default auto).")
@force_option("OUT if it is a previous `bakery gguf` folder")
@clear_errors
def gguf(export, out, from_gguf, outtype, force):
    """Write OUT with one GGUF of the bake EXPORT (an export folder of `bakery bake`).

    With --from-gguf, the bake is applied to that GGUF: a bias bake adds F32 bias tensors and copies
    everything else byte for byte; an ortho bake projects the direction out of the residual-writing
    tensors and quantizes them back to their type. Without it, EXPORT (any method) is converted by
    llama.cpp's own convert_hf_to_gguf.py, pinned."""
    from bakery.gguf import MANIFEST, gguf_bake

    folder = gguf_bake(export, out, from_gguf=from_gguf, outtype=outtype, force=force)
    d = json.loads((folder / MANIFEST).read_text())
    click.echo(f"wrote {folder / d['gguf']} ({d['edit']}, {d['file_type']})")
    for t in d["terms"]:
        where = f"blk.{t['block']}" + (f" ({t['tensor']})" if t.get("tensor") else "")
        click.echo(f"  layer {t['layer']} = output of block {t['layer'] - 1}: llama.cpp {where}")
    for n in d["notes"]:
        click.echo(f"  {n}")


COMMANDS = [gguf]
