"""The engine workers: a script run by the engine's own python (its own virtual environment),
spec in as JSON, result out as JSON; and finding that python."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bakery.engines.verdict import EngineNotInstalled


def find_engine_python(engine: str, env_var: str, venv: str, install: str, repo_root: Path) -> Path:
    """The python of an engine's own environment: ``$env_var``, else ``venv/bin/python`` in the
    checkout (``repo_root``) or the working directory. Raises :class:`EngineNotInstalled` saying
    how to install it (``install``)."""
    env = os.environ.get(env_var)
    candidates = [Path(env)] if env else []
    candidates += [repo_root / venv / "bin" / "python", Path.cwd() / venv / "bin" / "python"]
    for c in candidates:
        if c.is_file() and (c.parent.parent / "lib").is_dir():
            return c
    where = f"{env_var}={env} does not exist; " if env and not Path(env).is_file() else ""
    raise EngineNotInstalled(f"{engine} is not installed: {where}bakery runs it from its own virtual "
                             f"environment. To install it, {install}.")


def run_worker(worker: Path, spec: dict, *, python: Path, timeout: float, engine: str, module: str,
               install: str, env: dict[str, str] | None = None, tmp: Path | None = None, log=None) -> dict[str, Any]:
    """Run ``worker`` (a script that imports nothing from bakery) with ``python``, the python of
    the engine's own environment: ``spec`` goes in as JSON, its JSON result comes back. Lines the
    worker prints with its ``[name]`` prefix go to ``log``. A python without ``module`` is
    :class:`EngineNotInstalled` (``install`` says how to install it); any other failure is an
    error with the tail of the worker's output. ``tmp``: a folder for the files (default: a new
    temporary one)."""
    if tmp is None:
        with tempfile.TemporaryDirectory(prefix=f"bakery-{worker.stem}-") as t:
            return run_worker(worker, spec, python=python, timeout=timeout, engine=engine, module=module,
                              install=install, env=env, tmp=Path(t), log=log)
    src, dst, errf = tmp / "in.json", tmp / "out.json", tmp / "stderr.log"
    src.write_text(json.dumps(spec))
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}  # local folders only: never the Hub
    full_env.pop("PYTHONPATH", None)  # the worker imports nothing from bakery's environment
    t0 = time.time()
    with open(errf, "w") as err:
        proc = subprocess.Popen([str(python), str(worker), str(src), str(dst)], stdout=err,
                                stderr=subprocess.STDOUT, env=full_env, cwd=tmp, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the engine's own subprocesses too
            proc.wait()
            raise RuntimeError(f"the {engine} worker ran past {timeout:.0f} s and was stopped")
    text = errf.read_text(errors="replace")
    if rc != 0 or not dst.is_file():
        if f"No module named '{module}'" in text:
            raise EngineNotInstalled(f"{python} has no {module} module. To install it, {install}.")
        tail = "\n".join(text.strip().splitlines()[-25:])
        raise RuntimeError(f"the {engine} worker failed (exit {rc}) after {time.time() - t0:.0f} s:\n{tail}")
    if log:
        prefix = f"[{worker.stem}]"
        for line in text.splitlines():
            if line.startswith(prefix):
                log(line)
    out = json.loads(dst.read_text())
    out["wall_seconds"] = round(time.time() - t0, 1)
    return out
