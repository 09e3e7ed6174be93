#!/usr/bin/env python
"""Write a deliberately weakened copy of a bias bake, for the demo: `bakery verify` must fail on it.

    python scripts/weaken_bake.py EXPORT OUT [--scale 0.95]

EXPORT is a `bakery bake --method bias` folder. OUT (a new folder) gets a copy of it in which the
baked bias, the single non-zero `*.mlp.down_proj.bias` tensor in the safetensors shards, is
multiplied by SCALE. Everything else (config, other tensors, manifest, card) is copied as it is,
so the copy loads cleanly in every engine and only the size of the edit is wrong: the kind of
quiet error a verifier has to catch. Self-contained on purpose (safetensors and torch only), so it
does not depend on bakery's internals.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

SUFFIX = ".mlp.down_proj.bias"


def nonzero_down_biases(export: Path) -> list[tuple[Path, str]]:
    found = []
    for shard in sorted(export.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name.endswith(SUFFIX) and bool(f.get_tensor(name).abs().max() > 0):
                    found.append((shard, name))
    return found


def weaken(export: Path, out: Path, scale: float) -> tuple[Path, str]:
    if not (export / "config.json").is_file():
        raise SystemExit(f"{export} is not an exported model folder (no config.json)")
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or choose another folder")
    found = nonzero_down_biases(export)
    if len(found) != 1:
        names = ", ".join(n for _, n in found) or "none"
        raise SystemExit(f"{export}: expected exactly one non-zero *{SUFFIX} (a bias bake), found {names}")
    shard, name = found[0]

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # compare/ holds the original's fidelity report, which would not describe the copy
    shutil.copytree(export, tmp, ignore=shutil.ignore_patterns("compare"))
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    t = tensors[name]
    tensors[name] = (t.float() * scale).to(t.dtype)
    save_file(tensors, str(tmp / shard.name), metadata=metadata)
    tmp.rename(out)
    return shard, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path, help="a bias bake export folder")
    p.add_argument("out", type=Path, help="new folder for the weakened copy")
    p.add_argument("--scale", type=float, default=0.95, help="factor for the baked bias (default 0.95)")
    a = p.parse_args(argv)
    shard, name = weaken(a.export, a.out, a.scale)
    print(f"wrote {a.out}: {name} (in {shard.name}) scaled by {a.scale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
