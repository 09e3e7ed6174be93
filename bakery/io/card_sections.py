"""Named, replaceable sections of an export's model card (``README.md``).

Different commands own different parts of the card: the baker writes the body, ``compare`` the
fidelity table, ``verify`` the engine verdicts. Each part sits between HTML comment markers so a
re-run replaces it instead of appending a copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bakery:{name} -->", f"<!-- /bakery:{name} -->"


def read_section(card_text: str, name: str) -> str | None:
    start, end = _markers(name)
    m = re.search(re.escape(start) + r"\n(.*?)\n?" + re.escape(end), card_text, flags=re.S)
    return m.group(1) if m else None


def set_section(card_text: str, name: str, markdown: str) -> str:
    """Replace section ``name`` in ``card_text``, or append it at the end."""
    start, end = _markers(name)
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.escape(start) + r".*?" + re.escape(end)
    if re.search(pattern, card_text, flags=re.S):
        return re.sub(pattern, lambda _: block, card_text, count=1, flags=re.S)
    return card_text.rstrip("\n") + "\n\n" + block + "\n"


def write_section(export_dir: str | Path, name: str, markdown: str) -> Path:
    """Write section ``name`` into ``export_dir/README.md`` atomically."""
    path = Path(export_dir) / "README.md"
    text = path.read_text() if path.is_file() else ""
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(set_section(text, name, markdown))
    os.replace(tmp, path)
    return path
