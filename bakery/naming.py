"""Names derived from user text: the one rule for turning a trait or model name into a file name."""

from __future__ import annotations

import re


def slug(text: str, empty: str = "vector") -> str:
    """``text`` as a file-name part: letters, digits, ``.``, ``_`` and ``-``, lower case; runs of
    anything else become one ``-``. ``empty`` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-").lower() or empty
