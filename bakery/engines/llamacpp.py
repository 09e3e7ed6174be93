"""llama.cpp (a real run, llama-cpp-python built from source in its own virtual environment): the
check of ``bakery verify --engine llama.cpp`` on a GGUF of a bake (a ``bakery gguf`` folder).

The steered model's trajectories (transformers runtime steering) are scored teacher-forced in
llama.cpp with all logits on (:mod:`bakery.engines.llamacpp_worker`), per response position: the
log-probability of the actual token and the top-1 token. Two comparisons:

(a) the baked GGUF against llama.cpp's own runtime control vector on the unedited source GGUF
    (the same ``coef * v[L]`` at block ``L - 1``): the bake must equal llama.cpp's own steering.
    With quantized weights llama.cpp rounds activations to 8 bits, so any tiny change re-rolls the
    rounding; the yardstick is the jitter floor measured in the same run (the control vector
    against itself scaled by ``1 + JITTER_SCALE``). Pass: within :data:`JITTER_RATIO` x that floor
    and below :data:`FAR_FRACTION` x the unsteered model's gap to the control vector.
(b) the baked GGUF against transformers steering (or ablation; the bake in transformers for an
    approximate method), beside the noise floor: the unedited GGUF against the unedited model in
    transformers. Pass: within :data:`ENGINE_RATIO` x the floor (plus the jitter allowance) and
    below :data:`FAR_FRACTION` x the unedited GGUF's gap to the same target.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bakery.engines.runner import find_engine_python, run_worker
from bakery.engines.setup import Setup
from bakery.engines.verdict import Verdict
from bakery.errors import BakeryError
from bakery.gguf import MANIFEST

ENGINE = "llama.cpp"
REPO_ROOT = Path(__file__).resolve().parents[2]
GGUF_MANIFEST = MANIFEST  # bakery-gguf.json, written by `bakery gguf`
INSTALL_LLAMACPP = ("run `make llamacpp` in the bakery checkout (it builds llama-cpp-python from source "
                    "into .venv-llamacpp, about 8 minutes on 2 cores, and exports BAKERY_LLAMACPP_PYTHON), "
                    "or set BAKERY_LLAMACPP_PYTHON to a python that has llama_cpp installed")
JITTER_SCALE = 1e-6  # the control vector scaled by 1 + this: same steering, re-rolled rounding
JITTER_RATIO = 2.0  # (a): mean |Δlogprob| and top-1 disagreement within this x the jitter floor
ENGINE_RATIO = 2.0  # (b): mean |Δlogprob| to transformers within this x the noise floor (+ jitter)
FAR_FRACTION = 0.25  # both: the gap must also stay below this fraction of the unsteered gap
ABS_SLACK = 1e-4  # mean |Δlogprob| allowance when a floor measures (near) zero


class GGUFFolderError(BakeryError):
    """A folder that is not a readable ``bakery gguf`` output, or an export without one."""


# ---- the GGUF folder --------------------------------------------------------------------------------
@dataclass
class GGUFBake:
    """A ``bakery gguf`` output folder: one ``*.gguf`` and its ``bakery-gguf.json``."""

    folder: Path
    gguf: Path
    export: Path
    source: Path | None  # the unedited GGUF it was made from (None: converted from the export)
    source_sha256: str | None = None
    method: str = ""
    edit: str = ""
    file_type: Any = None
    terms: list[dict] = field(default_factory=list)


def is_gguf_folder(path: str | Path) -> bool:
    return (Path(path) / GGUF_MANIFEST).is_file()


def _resolve(p: str, folder: Path) -> Path:
    cand = Path(p).expanduser()
    if cand.is_absolute():
        return cand
    return next((c for c in (folder / cand, Path.cwd() / cand) if c.exists()), folder / cand)


def read_gguf_folder(folder: str | Path) -> GGUFBake:
    folder = Path(folder)
    path = folder / GGUF_MANIFEST
    if not path.is_file():
        raise GGUFFolderError(f"{folder} has no {GGUF_MANIFEST}: not a `bakery gguf` output folder "
                              "(make one with `bakery gguf EXPORT -o OUTDIR`)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GGUFFolderError(f"{path} is not valid JSON ({e}); recreate the folder with `bakery gguf`") from e
    missing = [k for k in ("gguf", "export") if not m.get(k)]
    if missing:
        raise GGUFFolderError(f"{path} lacks {', '.join(missing)}; recreate the folder with `bakery gguf`")
    gguf = folder / m["gguf"]
    if not gguf.is_file():
        raise GGUFFolderError(f"{path} names {m['gguf']}, which is not in {folder}")
    export = _resolve(str(m["export"]), folder)
    if not (export / "config.json").is_file():
        raise GGUFFolderError(f"{path} names the export {m['export']}, which is not an export folder "
                              "(no config.json there); the check needs its manifest and vectors")
    src = m.get("source_gguf") or None
    source = _resolve(str(src["path"]), folder) if src else None
    if source is not None and not source.is_file():
        raise GGUFFolderError(f"{path} names the unedited GGUF {src['path']}, which does not exist; "
                              "the control-vector comparison and the noise floor need it")
    return GGUFBake(folder, gguf, export, source, (src or {}).get("sha256"), m.get("method", ""),
                    m.get("edit", ""), m.get("file_type"), list(m.get("terms") or []))


def check_source(g: GGUFBake) -> None:
    """Refuse a source GGUF that changed since ``bakery gguf`` recorded it: (a) and the noise floor
    would run on another model than the one the bake was made from."""
    if g.source is None or not g.source_sha256:
        return
    from bakery.io.digest import file_sha256

    now = file_sha256(g.source)
    if now != g.source_sha256:
        raise GGUFFolderError(f"the unedited GGUF {g.source} changed since `bakery gguf` wrote {g.folder} "
                              f"(sha256 {now[:12]}... != recorded {g.source_sha256[:12]}...): restore it, or "
                              "rerun `bakery gguf` on the GGUF you have now")


def gguf_setup(folder: str | Path, *, model: str | None = None, prompts=None, max_new_tokens: int = 48,
               seed: int = 0) -> Setup:
    """The :class:`Setup` of a GGUF folder's export, with the folder attached as ``setup.gguf``."""
    g = read_gguf_folder(folder)
    s = Setup(g.export, model=model, prompts=prompts, max_new_tokens=max_new_tokens, seed=seed)
    s.gguf = g
    return s


def setup_for(path: str | Path, **kw) -> Setup:
    """``bakery verify``'s Setup for PATH: a GGUF folder's export with the GGUF attached, else an export."""
    return gguf_setup(path, **kw) if is_gguf_folder(path) else Setup(path, **kw)


def gguf_of(s: Setup) -> GGUFBake:
    """The GGUF a setup checks: ``setup.gguf``, else the one ``bakery gguf`` folder inside the export."""
    g = getattr(s, "gguf", None)
    if g is not None:
        return g
    found = sorted(p.parent for p in Path(s.export).glob(f"*/{GGUF_MANIFEST}"))
    if len(found) == 1:
        return read_gguf_folder(found[0])
    what = "no GGUF" if not found else f"{len(found)} GGUF folders ({', '.join(p.name for p in found)})"
    raise GGUFFolderError(f"{s.export} has {what}: llama.cpp runs GGUF files. Make one with `bakery gguf "
                          f"{s.export} -o OUTDIR` and verify OUTDIR (`bakery verify OUTDIR --engine llama.cpp`)")


# ---- the runner -------------------------------------------------------------------------------------
def find_llamacpp_python() -> Path:
    """The python of the llama.cpp environment: $BAKERY_LLAMACPP_PYTHON, else ./.venv-llamacpp/bin/python."""
    return find_engine_python("llama.cpp", "BAKERY_LLAMACPP_PYTHON", ".venv-llamacpp", INSTALL_LLAMACPP, REPO_ROOT)


@dataclass
class ControlVector:
    """llama.cpp's runtime control vector: a float32 buffer from block 1, blocks il_start..il_end."""

    buffer: np.ndarray
    il_start: int
    il_end: int

    def scaled(self, f: float) -> "ControlVector":
        return ControlVector((self.buffer * np.float32(f)).astype(np.float32), self.il_start, self.il_end)

    def key(self) -> str:
        return hashlib.sha256(self.buffer.tobytes() + f"{self.il_start},{self.il_end}".encode()).hexdigest()[:16]


def control_vector(ref, n_embd: int, n_layer: int) -> tuple[ControlVector | None, str]:
    """The reference's steering as a llama.cpp control vector, or None and why it has none."""
    if ref.ablation:
        return None, "an ablation has no llama.cpp control-vector equivalent"
    if ref.site != "resid-out":
        return None, f"llama.cpp control vectors act on block outputs, not the {ref.site} site"
    if ref.positions != "all":
        return None, f"a control vector steers every position, the reference only {ref.positions}"
    if not ref.terms:
        return None, "the reference has no steering terms"
    buf = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    blocks = []
    for t in ref.terms:
        il = t.layer - 1  # llama.cpp names a direction after the block whose output it is added to
        if not 1 <= il < n_layer:
            return None, f"llama.cpp has no control vector for block {il} (layer {t.layer})"
        buf[(il - 1) * n_embd: il * n_embd] += t.delta().numpy().astype(np.float32)
        blocks.append(il)
    return ControlVector(buf, min(blocks), max(blocks)), ""


def score_gguf(runs: list[dict], *, n_ctx: int = 512, python: Path | None = None, timeout: float = 1800,
               log=None) -> dict[str, Any]:
    """Score token ids teacher-forced in llama.cpp. Each run: ``{"name", "gguf", "prompts": [[ids]],
    "cvec": ControlVector | None}``. Returns the worker's output (see :mod:`llamacpp_worker`)."""
    python = python or find_llamacpp_python()
    threads = os.environ.get("BAKERY_THREADS")
    with tempfile.TemporaryDirectory(prefix="bakery-llamacpp-") as tmp:
        spec_runs = []
        for r in runs:
            sr = {"name": r["name"], "gguf": str(Path(r["gguf"]).resolve()), "prompts": r["prompts"]}
            cv = r.get("cvec")
            if cv is not None:
                f = Path(tmp) / f"cvec-{len(spec_runs)}.f32"
                cv.buffer.astype(np.float32).tofile(f)
                sr["cvec"] = {"file": str(f), "il_start": cv.il_start, "il_end": cv.il_end}
            spec_runs.append(sr)
        spec = {"runs": spec_runs, "n_ctx": n_ctx, "n_threads": int(threads) if threads else None,
                "n_gpu_layers": int(os.environ.get("BAKERY_LLAMACPP_GPU_LAYERS", "0")),
                "extra_bufts": os.environ.get("BAKERY_LLAMACPP_EXTRA_BUFTS", "") == "1"}
        return _run_worker(spec, Path(tmp), python=python, timeout=timeout, log=log)


def _run_worker(spec: dict, tmp: Path, *, python: Path, timeout: float, log=None) -> dict[str, Any]:
    return run_worker(Path(__file__).with_name("llamacpp_worker.py"), spec, python=python, timeout=timeout,
                      engine="llama.cpp", module="llama_cpp", install=INSTALL_LLAMACPP, tmp=tmp, log=log)


# ---- the check --------------------------------------------------------------------------------------
def verify_llamacpp(setups: Sequence[Setup], *, log=None, timeout: float = 1800) -> list[Verdict]:
    """One verdict per setup (an export with its GGUF: :func:`gguf_setup`, or an export holding one
    ``bakery gguf`` folder). All GGUF runs go to one llama.cpp process; each GGUF loads once."""
    python = find_llamacpp_python()
    from bakery.models import read_config

    runs: dict[tuple, dict] = {}

    def add(gguf: Path, rows, cvec: ControlVector | None = None) -> str:
        key = (str(Path(gguf).resolve()), cvec.key() if cvec else "", tuple(tuple(r[0]) for r in rows))
        if key not in runs:
            runs[key] = {"name": f"run{len(runs)}", "gguf": gguf, "prompts": [r[0] for r in rows], "cvec": cvec}
        return runs[key]["name"]

    plans = []
    for s in setups:
        g = gguf_of(s)
        check_source(g)
        rows = s.rows()
        cfg = read_config(s.base_dir)
        if g.source is None:
            cv, why = None, "no unedited source GGUF is recorded (a converted export)"
        elif not s.manifest.exact:
            cv, why = None, f"a {s.manifest.method} bake is approximate: it is held to itself in transformers"
        else:
            cv, why = control_vector(s.ref, int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]))
        p = {"s": s, "g": g, "rows": rows, "no_cvec": why, "bake": add(g.gguf, rows)}
        if g.source is not None:
            p["source"] = add(g.source, rows)
        if cv is not None:
            p["cvec"] = add(g.source, rows, cv)
            p["jitter"] = add(g.source, rows, cv.scaled(1 + JITTER_SCALE))
        plans.append(p)
    longest = max(len(r[0]) for p in plans for r in p["rows"])
    ordered = sorted(runs.values(), key=lambda r: str(Path(r["gguf"]).resolve()))  # stable: one load a GGUF
    res = score_gguf(ordered, n_ctx=max(256, 1 << longest.bit_length()), python=python, timeout=timeout, log=log)
    return [_verdict(p, res) for p in plans]


def _verdict(p: dict, res: dict) -> Verdict:
    from bakery.engines.scores import gap, tf_scores
    from bakery.models import load_model

    s, g, rows = p["s"], p["g"], p["rows"]
    out = {k: res["runs"][p[k]] for k in ("bake", "source", "cvec", "jitter") if k in p}
    sc = {k: v["prompts"] for k, v in out.items()}
    tf_steered = tf_scores(s.base, rows, s.ref.context(s.base))
    tf_base = tf_scores(s.base, rows)
    tf_bake = tf_scores(load_model(s.export), rows)  # the export's own weights, for the diagnosis
    if s.manifest.exact:
        target = tf_steered
        target_name = "transformers runtime ablation" if s.ref.ablation else "transformers runtime steering"
    else:
        target, target_name = tf_bake, "the bake in transformers"
    d: dict[str, Any] = {
        "gguf": str(g.gguf), "gguf_terms": g.terms, "source_gguf": str(g.source) if g.source else None, "edit": g.edit,
        "file_type": g.file_type, "target": target_name, "reference": s.ref.describe(),
        "llama_cpp_version": res.get("llama_cpp_version"), "extra_bufts": res.get("extra_bufts"),
        "prompts": len(rows),
        "wall_seconds": res.get("wall_seconds"), "n_params": {k: v["n_params"] for k, v in out.items()},
        "bake_vs_target": gap(sc["bake"], target, rows), "bake_vs_steered": gap(sc["bake"], tf_steered, rows),
        "bake_vs_transformers_bake": gap(sc["bake"], tf_bake, rows),
        "transformers_bake_vs_target": gap(tf_bake, target, rows),
    }
    lines, fails = [], []
    if "cvec" in sc:
        a, jit, un = (gap(sc["bake"], sc["cvec"], rows), gap(sc["jitter"], sc["cvec"], rows),
                      gap(sc["source"], sc["cvec"], rows))
        d.update(bake_vs_cvec=a, jitter_floor=jit, unsteered_vs_cvec=un,
                 cvec_vs_target=gap(sc["cvec"], target, rows), jitter_scale=JITTER_SCALE,
                 cvec_blocks=[t.layer - 1 for t in s.ref.terms])
        lim = JITTER_RATIO * jit["mean_abs_logprob_gap"] + ABS_SLACK
        lim_top1 = 1 - (JITTER_RATIO * (1 - jit["top1"]) + 1 / a["positions"])
        far = FAR_FRACTION * un["mean_abs_logprob_gap"]
        lines.append(f"(a) vs llama.cpp's own control vector on the unedited GGUF (block "
                     f"{', '.join(map(str, d['cvec_blocks']))}): top-1 {a['top1']:.4f}, mean |Δlogprob| "
                     f"{a['mean_abs_logprob_gap']:.5f}; jitter floor (vector x (1+{JITTER_SCALE:g})): top-1 "
                     f"{jit['top1']:.4f}, {jit['mean_abs_logprob_gap']:.5f}; unsteered: top-1 {un['top1']:.4f}, "
                     f"{un['mean_abs_logprob_gap']:.4f}")
        if a["mean_abs_logprob_gap"] > lim or a["top1"] < lim_top1:
            fails.append(f"the bake differs from llama.cpp's own steering by more than {JITTER_RATIO:g}x the "
                         f"jitter floor (mean |Δlogprob| {a['mean_abs_logprob_gap']:.5f} > {lim:.5f} or top-1 "
                         f"{a['top1']:.4f} < {lim_top1:.4f})")
        if a["mean_abs_logprob_gap"] >= far:
            fails.append(f"the bake is not far from the unsteered model (mean |Δlogprob| to the control "
                         f"vector {a['mean_abs_logprob_gap']:.4f} >= {FAR_FRACTION:g} x the unsteered gap "
                         f"{far / FAR_FRACTION:.4f})")
    else:
        d["no_control_vector"] = p["no_cvec"]
        lines.append(f"(a) not run: {p['no_cvec']}")
    b = d["bake_vs_target"]
    jitter_mean = d["jitter_floor"]["mean_abs_logprob_gap"] if "jitter_floor" in d else 0.0
    if "source" in sc:
        nf, un_t = gap(sc["source"], tf_base, rows), gap(sc["source"], target, rows)
        d.update(noise_floor_source_llamacpp_vs_transformers=nf, unedited_vs_target=un_t)
        lim = ENGINE_RATIO * nf["mean_abs_logprob_gap"] + JITTER_RATIO * jitter_mean + ABS_SLACK
        floor_text = (f"noise floor, unedited GGUF vs unedited model in transformers: top-1 {nf['top1']:.4f}, "
                      f"{nf['mean_abs_logprob_gap']:.5f}; unedited GGUF vs target: top-1 {un_t['top1']:.4f}, "
                      f"{un_t['mean_abs_logprob_gap']:.4f}")
        if b["mean_abs_logprob_gap"] > lim:
            fails.append(f"llama.cpp's bake differs from {target_name} by more than {ENGINE_RATIO:g}x the noise "
                         f"floor (mean |Δlogprob| {b['mean_abs_logprob_gap']:.5f} > {lim:.5f})")
        unsteered = un_t["mean_abs_logprob_gap"]
    else:
        un_t = gap(sc["bake"], tf_base, rows)
        d["bake_vs_unedited_transformers"] = un_t
        floor_text = "no unedited GGUF, so no noise floor; judged against the unedited model's gap only"
        unsteered = un_t["mean_abs_logprob_gap"]
    if b["mean_abs_logprob_gap"] >= FAR_FRACTION * unsteered:
        fails.append(f"llama.cpp's bake is not far from the unedited model's gap to {target_name} "
                     f"({b['mean_abs_logprob_gap']:.4f} >= {FAR_FRACTION:g} x {unsteered:.4f})")
    lines.append(f"(b) vs {target_name}: top-1 {b['top1']:.4f}, mean |Δlogprob| {b['mean_abs_logprob_gap']:.5f} "
                 f"({floor_text}) on {b['positions']} response positions")
    if "source" in out:
        added = out["bake"]["n_params"] - out["source"]["n_params"]
        d["added_params"] = added
        lines.append(f"the bake loads with {added:+d} parameters vs the unedited GGUF")
    msg = "; ".join(lines)
    if fails:
        return Verdict(ENGINE, "fail", " ".join(f + "." for f in fails) + " — " + msg, details=d)
    return Verdict(ENGINE, "pass", msg, details=d)
