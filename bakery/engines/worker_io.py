"""The input/output of every engine worker (vllm_worker, sglang_worker, llamacpp_worker): a JSON
spec in, a JSON result out, written atomically. Workers run with the engine's own python, where
bakery is not installed: they import this file as a sibling (the script's folder is on sys.path),
so it imports nothing from bakery."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable


def serve(run: Callable[[dict], dict], argv: list[str], *, hard_exit: bool = False) -> None:
    """``python WORKER.py INPUT.json OUTPUT.json``: ``run(spec)`` and write its result, then exit.
    ``hard_exit``: leave with ``os._exit`` after flushing (engines whose teardown can hang or abort
    after the work is done)."""
    if len(argv) != 3:
        print(f"usage: python {Path(argv[0]).name} INPUT.json OUTPUT.json", file=sys.stderr)
        code = 2
    else:
        with open(argv[1]) as f:
            spec = json.load(f)
        result = run(spec)
        tmp = argv[2] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, argv[2])
        code = 0
    if hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
