"""Names: the one rule for turning a trait or model name into a file name, and the one way every
report says a layer (row ``L`` of a vector is the output of block ``L-1``)."""

from __future__ import annotations

import re


def slug(text: str, empty: str = "vector") -> str:
    """``text`` as a file-name part: letters, digits, ``.``, ``_`` and ``-``, lower case; runs of
    anything else become one ``-``. ``empty`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-").lower() or empty


def describe_layer(layer: int) -> str:
    """``"layer 20 = output of block 19"``: both numbers, since tools count differently."""
    if layer == 0:
        return "layer 0 = embedding output"
    return f"layer {layer} = output of block {layer - 1}"
