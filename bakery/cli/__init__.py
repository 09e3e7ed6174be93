"""The ``bakery`` command line: a thin layer over the library.

Each module in this package holds one command (or group) and exposes it as ``COMMANDS``; they are
collected here so that adding a command touches only its own file.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

from bakery import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bakery")
def main() -> None:
    """Bake activation-steering vectors into ordinary model checkpoints."""


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name.startswith("_") or _mod.name == "common":
        continue
    for _cmd in getattr(importlib.import_module(f"{__name__}.{_mod.name}"), "COMMANDS", ()):
        main.add_command(_cmd)
