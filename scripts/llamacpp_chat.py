"""Greedy chat answers from GGUF files in llama.cpp, side by side (run with the llama.cpp venv's
python: `make llamacpp`). Used by the demo to show a baked GGUF speaking in its persona with no
control vector and no flag.

    python scripts/llamacpp_chat.py PROMPT MODEL.gguf [MODEL.gguf ...]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parents[1] / "bakery" / "engines" / "llamacpp_worker.py"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("llamacpp_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)  # its loader keeps the extra CPU buffer types off (see there)
    prompt = argv[1]
    for path in argv[2:]:
        llm = worker._load(path, {"n_ctx": 512})
        out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=48,
                                         temperature=0.0, seed=0)
        text = " ".join(out["choices"][0]["message"]["content"].split())
        print(f"[{Path(path).name}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
