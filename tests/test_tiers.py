"""The tiers' machinery: the engine tests run on one xdist worker, one after another."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TEST = """
import os, time, pytest

@pytest.mark.{mark}
def test_engine_{i}():
    time.sleep(0.3)
    with open(os.environ["WHERE"], "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

def test_plain_{i}():
    time.sleep(0.3)
"""


def test_engine_tests_share_one_xdist_worker(tmp_path):
    """Six engine tests in six files, among plain ones, on two workers: all six on one worker.
    (Under pytest 9 with xdist 3.8 the group never reached the node ids, and they spread.)"""
    marks = ["vllm", "sglang", "llamacpp"] * 2
    for i, mark in enumerate(marks):
        (tmp_path / f"test_{i}.py").write_text(TEST.format(mark=mark, i=i))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n  vllm: x\n  sglang: x\n  llamacpp: x\n")
    where = tmp_path / "workers.txt"
    env = {**os.environ, "WHERE": str(where), "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "engine_group",
                        "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    workers = where.read_text().split()
    assert len(workers) == 6 and len(set(workers)) == 1, workers
