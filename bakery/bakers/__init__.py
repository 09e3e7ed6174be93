"""The bake methods and the library entry point :func:`bake`.

Each method is one module with one typed config (:mod:`bakery.bakers.config`) that registers
itself in :mod:`bakery.bakers.registry`; this package imports them so that they do, and hands on
the registry's lookups. Every method, closed-form or distilled, writes its export through the one
export path (:func:`bakery.bakers.export.write_export`).
"""

from __future__ import annotations

# the methods register themselves on import, in this order (`bakery bake --help` lists them so)
from bakery.bakers import bias, ortho, distilled  # noqa: F401,I001
from bakery.bakers.api import bake, default_output, prepare, reproduce_command, resolve_terms
from bakery.bakers.registry import available, coef_message, config_classes, get_baker, make_config, register

__all__ = ["register", "get_baker", "available", "config_classes", "make_config", "coef_message", "bake",
           "default_output", "prepare", "reproduce_command", "resolve_terms"]
