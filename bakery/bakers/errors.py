"""The bakers' error: a bake that cannot be done as asked."""

from __future__ import annotations

from bakery.errors import BakeryError


class BakeError(BakeryError):
    """A bake that cannot be done as asked; the message names what to do instead."""
