"""What every engine check shares: the verdict, the per-export setup (base model, reference,
trajectories) and reading an export's checkpoint (tensor names, non-zero biases, what
transformers builds for its config)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from bakery.errors import BakeryError
from bakery.fidelity.metrics import Trajectories, sample_trajectories
from bakery.fidelity.prompts import resolve_prompts
from bakery.fidelity.reference import Reference, base_model_of, check_base_matches, reference_for
from bakery.io.manifest import Manifest
from bakery.models import load_model, load_tokenizer, read_config
from bakery.placement import input_device

RULES_ONLY = "rules only (not run)"
KINDS = ("run", "rules", "not-installed", "not-applicable")


class EngineNotInstalled(BakeryError):
    """An engine bakery cannot find; the message says how to install it."""


@dataclass
class Verdict:
    """One engine's verdict on one export.

    ``kind``: ``run`` (the engine loaded and ran the export), ``rules`` (read from the engine's
    loading rules, nothing ran: sglang when it is not installed) or ``not-installed``. ``status``:
    ``pass`` or ``fail`` for a run; for rules, ``fail`` when the rules find the edit is lost, else
    ``not-run`` (a clean rule check is neither a pass nor a fail); ``not-run`` when not installed."""

    engine: str
    status: str  # pass | fail | not-run
    message: str
    launch_flag: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    kind: str = "run"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"verdict kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind != "run" and self.status == "pass":
            raise ValueError(f"a {self.kind} verdict cannot pass: nothing ran")

    @property
    def ran(self) -> bool:
        return self.kind == "run"

    @property
    def passed(self) -> bool:
        """A real run that passed: the only verdict that counts as a pass."""
        return self.ran and self.status == "pass"

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    ok = passed  # older name

    @property
    def label(self) -> str:
        """The verdict as printed everywhere (terminal, markdown, JSON)."""
        if self.kind == "rules":
            return f"✘ FAIL, {RULES_ONLY}" if self.failed else f"– {RULES_ONLY}"
        if self.kind == "not-installed":
            return "– not installed (not run)"
        if self.kind == "not-applicable":
            return "– not applicable (not run)"
        return "✔ pass" if self.passed else "✘ FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "status": self.status, "kind": self.kind, "ran": self.ran,
                "ok": self.passed, "label": self.label, "message": self.message,
                "launch_flag": self.launch_flag, "details": self.details}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Verdict":
        """From :meth:`to_dict`, or from a ``verify.json`` written before verdicts had a kind (an
        sglang verdict there was a rules-only one, whatever its status said)."""
        kind, status = d.get("kind"), d.get("status", "fail")
        if kind is None:
            kind = "not-installed" if status == "not-installed" else "rules" if d.get("engine") == "sglang" else "run"
        if kind != "run" and status != "fail":
            status = "not-run"
        return cls(d["engine"], status, d.get("message", ""), d.get("launch_flag"), d.get("details") or {}, kind)


# ---- the shared setup: base, reference, trajectories ---------------------------------------------
class Setup:
    """Everything the checks of one export share, computed once and lazily."""

    def __init__(self, export: str | Path, *, model: str | None = None, prompts=None,
                 max_new_tokens: int = 48, seed: int = 0):
        self.export = Path(export)
        if not (self.export / "config.json").is_file():
            raise FileNotFoundError(f"{self.export} is not an exported model folder (no config.json)")
        self.manifest = Manifest.load(self.export)
        self.base_dir = base_model_of(self.export, self.manifest, model)
        check_base_matches(self.export, self.manifest, self.base_dir)
        self.ref: Reference = reference_for(self.export, self.manifest, base_config=read_config(self.base_dir))
        self.prompts = resolve_prompts(prompts, self.ref.vector.trait)[0]
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self._base = self._tok = self._traj = None

    @property
    def base(self):
        if self._base is None:
            self._base = load_model(self.base_dir)
        return self._base

    @property
    def tok(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.base_dir)
        return self._tok

    @property
    def trajectories(self) -> Trajectories:
        """Sampled from the steered reference for the held-out prompts."""
        if self._traj is None:
            from bakery.steering.generation import render_chat

            rendered = [render_chat(self.tok, q) for q in self.prompts]
            self._traj = sample_trajectories(self.base, self.tok, rendered, self.ref.context(self.base),
                                             max_new_tokens=self.max_new_tokens, seed=self.seed)
        return self._traj

    def rows(self) -> list[tuple[list[int], int]]:
        """Each trajectory without padding: (token ids, index of the first response token)."""
        out = []
        for ids, mask, P in self.trajectories.batches:
            for i in range(ids.shape[0]):
                m = mask[i].bool()
                pad = int((~m[:P]).sum())
                seq = ids[i][m].tolist()
                out.append((seq, P - pad))
        return out


# ---- reading an export's checkpoint --------------------------------------------------------------
def checkpoint_tensor_names(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> file for a safetensors checkpoint (single file or sharded with an index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def transformers_param_names(folder: str | Path, trust_remote_code: bool = False) -> set[str]:
    """Parameter and buffer names transformers builds for the folder's config.json (on the meta
    device, so nothing is allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    return set(model.state_dict().keys())


def nonzero_biases(folder: str | Path, names: dict[str, Path] | None = None) -> list[str]:
    """Bias tensors of the checkpoint with any non-zero entry (a dropped all-zero bias is harmless)."""
    from safetensors import safe_open

    names = names or checkpoint_tensor_names(folder)
    by_file: dict[Path, list[str]] = {}
    for n, f in names.items():
        if n.endswith("bias"):
            by_file.setdefault(f, []).append(n)
    out = []
    for f, ns in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            out.extend(n for n in ns if bool(h.get_tensor(n).float().abs().max() > 0))
    return sorted(out)


def undeclared_message(export: Path, unexpected: Sequence[str]) -> str:
    """Why tensors the config does not declare are lost, naming the missing config flag."""
    cfg = read_config(export)
    flags = []
    if any(".mlp." in k for k in unexpected) and not cfg.get("mlp_bias"):
        flags.append("mlp_bias: true")
    if any(".self_attn." in k for k in unexpected) and not cfg.get("attention_bias"):
        flags.append("attention_bias: true")
    hint = f" (config.json lacks {' and '.join(flags)})" if flags else ""
    return (f"config.json does not declare {', '.join(list(unexpected)[:3])}"
            f"{' and more' if len(unexpected) > 3 else ''}{hint}, so the engines drop these tensors "
            "and the edit is lost")


# ---- teacher-forced scores, shared by the engine checks ------------------------------------------
@torch.no_grad()
def tf_scores(model, rows: list[tuple[list[int], int]], context=None) -> list[dict[str, list]]:
    """Per position, unpadded: log-prob of the actual token and the top-1 token (transformers)."""
    out = []
    for seq, start in rows:
        ids = torch.tensor([seq], device=input_device(model))
        ctx = context(start) if context else None
        if ctx is not None:
            with ctx:
                logits = model(input_ids=ids).logits[0].float()
        else:
            logits = model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits[:-1].cpu(), -1)
        actual = lp.gather(1, ids[0, 1:, None].cpu())[:, 0]
        out.append({"logprob": [None] + actual.tolist(), "top1": [None] + lp.argmax(-1).tolist()})
    return out


def gap(a: list[dict], b: list[dict], rows: list[tuple[list[int], int]]) -> dict[str, float]:
    """Top-1 agreement and mean |log-prob gap| of the actual token, over response positions."""
    agree = total = n = 0
    worst = 0.0
    for sa, sb, (seq, start) in zip(a, b, rows):
        for t in range(start, len(seq)):
            la, lb = sa["logprob"][t], sb["logprob"][t]
            if la is None or lb is None:
                continue
            agree += int(sa["top1"][t] == sb["top1"][t])
            d = abs(la - lb)
            total += d
            worst = max(worst, d)
            n += 1
    if n == 0:
        raise BakeryError("no response positions to compare: the trajectories are empty")
    return {"top1": agree / n, "mean_abs_logprob_gap": total / n, "max_abs_logprob_gap": worst, "positions": n}


# ---- the engine workers: a script run by the engine's own python --------------------------------
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
