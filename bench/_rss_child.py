"""``python bench/_rss_child.py ARGS...`` runs ``bakery ARGS...`` and, at exit, writes this
process's peak resident memory to ``$BAKERY_BENCH_RSS_DIR/rank<RANK>.json`` (for
bench/sharded_memory.py, one file per launched rank)."""

import atexit
import json
import os
import resource
import sys
from pathlib import Path


def _record() -> None:
    folder = os.environ.get("BAKERY_BENCH_RSS_DIR")
    if folder:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(folder, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak_rss_mb": round(peak, 1)}))


if __name__ == "__main__":
    atexit.register(_record)
    from bakery.cli import main

    sys.argv = ["bakery", *sys.argv[1:]]
    main()
