"""``python bench/_rss_child.py ARGS...`` runs ``bakery ARGS...`` and, at exit, writes this
process's peak resident memory to ``$BAKERY_BENCH_RSS_DIR/rank<RANK>.json`` (for
bench/sharded_memory.py, one file per launched rank).

The peak is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process's own
memory. ``getrusage``'s ``ru_maxrss`` survives ``execve`` on Linux, so a process started by a
large parent would report the parent's peak."""

import atexit
import json
import os
import sys
from pathlib import Path

from bake import _peak_mb  # VmHWM, as bench/bake.py measures its contenders


def _record() -> None:
    folder = os.environ.get("BAKERY_BENCH_RSS_DIR")
    if folder:
        peak = _peak_mb()
        Path(folder, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak_rss_mb": round(peak, 1)}))


if __name__ == "__main__":
    atexit.register(_record)
    from bakery.cli import main

    sys.argv = ["bakery", *sys.argv[1:]]
    main()
