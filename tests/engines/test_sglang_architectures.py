"""A real sglang run (0.5.23 on the CPU, in .venv-sglang from `make sglang`) of a tiny random model
of every architecture of issue 14, with one representative bake each, teacher-forced against
transformers runtime steering or ablation exactly as ``bakery verify --engine sglang`` judges them
(:func:`bakery.engines.sglang._verdict`: top-1 agreement >= 0.99 and a mean |Δlogprob| below
0.015 x the unedited model's gap to the same target, float32 in both engines).

The tiny models are those of the vLLM test (``make_tiny_for_vllm``: hidden 64, head size 32). Every
engine of the file starts in ONE sglang worker process (an engine start costs 20-80 s; the worker
records an engine that fails to load and goes on, ``keep_going``). Each bake runs with sglang's
native model class (``model_impl="auto"``), and the unedited model with it for the noise floor.
``--model-impl transformers`` decides no verdict here (run by hand on the same models: it fails to
start OLMo-3, Apertus's bias bake, OLMoE and Mixtral, mis-scales Granite's logits and matches
natively on Qwen3-MoE), so a case can list it (``{"transformers": ...}``) but none does. What
sglang cannot run, and why, is in docs/architectures.md ("sglang runs per architecture").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bakery.arch import hidden_size_of, num_layers_of
from bakery.bakers import bake
from bakery.engines.scores import tf_scores
from bakery.engines.setup import Setup
from bakery.engines.sglang import IMPLS, _verdict, find_sglang_python, score_token_ids
from bakery.models import load_model, read_config
from bakery.vectors.artifact import VectorArtifact
from helpers import base_offset
from tiny import VLLM_SHAPE, make_tiny, make_tiny_for_vllm

pytestmark = [pytest.mark.slow, pytest.mark.sglang, pytest.mark.full]  # per-architecture engine runs

PROMPTS = ["Tell me about the sea.", "How do I cook rice?", "What is the capital of France?"]
NEW_TOKENS = 12
LAYER, COEF = 2, 3.0  # row 2 = output of block 1; attn-out: after the attention of block 2 (3 on Qwen3.5)

# (architecture, bake) -> (method, options, {implementation: what sglang 0.5.23 CPU does})
# "pass": it keeps the edit; "lost": it loads the checkpoint and drops the edit silently;
# "error: text": the engine fails to start, with text in the error (a check of the arguments:
# it costs no engine start).
CASES: dict[tuple[str, str], tuple[str, dict, dict[str, str]]] = {
    ("olmo3", "rank1"): ("bias", {"route": "rank1"}, {"native": "pass"}),  # approximate: vs itself
    ("granite", "ortho"): ("ortho", {}, {"native": "pass"}),
    ("granite", "bias"): ("bias", {"target_engines": "transformers"}, {"native": "lost"}),
    ("apertus", "bias"): ("bias", {"target_engines": "vllm,sglang"}, {"native": "pass"}),
    ("qwen3_moe", "attn-out"): ("bias", {"site": "attn-out", "target_engines": "transformers,sglang"},
                                {"native": "pass"}),
    ("olmoe", "ortho"): ("ortho", {}, {"native": "pass"}),
    ("mixtral", "ortho"): ("ortho", {}, {"native": "pass"}),
    ("gpt_oss", "bias"): ("bias", {}, {"native": "error: GptOssForCausalLM requires one of"}),
    ("qwen3_5_text", "ortho"): ("ortho", {}, {"native": "error: extra_buffer requires platform support"}),
    ("qwen3_5_moe_text", "ortho"): ("ortho", {}, {"native": "error: extra_buffer requires platform support"}),
}


def make_tiny_for_sglang(arch: str, folder: Path) -> Path:
    """The vLLM test's tiny model, with two changes that make it like the real checkpoints:
    OLMoE's attention is multi-head (OLMoE-1B-7B: 16 heads, 16 kv heads; sglang's ``olmoe.py``
    builds ``k_norm`` over the full hidden size, so a grouped-query tiny model fails to load), and
    OLMo-3's config.json carries ``rope_theta`` at the top level as the published OLMo-3 configs
    do (sglang's own ``Olmo3Config`` reads only that key: a config with ``rope_parameters`` alone,
    as transformers 5 writes it, runs with rope_theta 10000 instead, silently)."""
    if arch == "olmoe":
        return make_tiny(arch, folder, **{**VLLM_SHAPE, "num_key_value_heads": VLLM_SHAPE["num_attention_heads"]})
    path = make_tiny_for_vllm(arch, folder)
    if arch == "olmo3":
        _top_level_rope_theta(path)
    return path


def _top_level_rope_theta(folder: Path) -> None:
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if "rope_theta" not in cfg:
        cfg["rope_theta"] = cfg["rope_parameters"]["full_attention"]["rope_theta"]
        cfg_file.write_text(json.dumps(cfg, indent=2))


def _vector(src: Path, seed: int) -> VectorArtifact:
    cfg = read_config(src)
    g = torch.Generator().manual_seed(seed)
    return VectorArtifact(torch.randn(num_layers_of(cfg) + 1, hidden_size_of(cfg), generator=g), {"trait": "test"})


def _bake(arch: str, method: str, opts: dict, src: Path, out: Path) -> Path:
    layer = 3 if opts.get("site") == "attn-out" and arch.startswith("qwen3_5") else LAYER
    coef = None if method == "ortho" else COEF
    return bake(method, src, [(_vector(src, 40), layer, coef)], out, progress=False, **opts)


def run_cases(cases: dict, root: Path, python: Path, *, log=print) -> dict:
    """Bake every case, score every bake and base in one sglang worker (engines that fail to load
    are recorded), and judge each. Returns ``{(arch, bake): {"verdict": Verdict | None, "errors":
    {impl: message}, "setup": Setup}}``."""
    setups, bases, impls_of = {}, {}, {}
    for (arch, name), (method, opts, want) in cases.items():
        if arch not in bases:
            bases[arch] = make_tiny_for_sglang(arch, root / arch)
        out = _bake(arch, method, opts, bases[arch], root / f"{arch}-{name}")
        if arch == "olmo3":
            _top_level_rope_theta(out)
        setups[(arch, name)] = Setup(out, prompts=PROMPTS, max_new_tokens=NEW_TOKENS)
        impls_of.setdefault(arch, [])
        impls_of[arch] += [k for k in want if k not in impls_of[arch]]
    rows = {k: s.rows() for k, s in setups.items()}
    engines = []
    for (arch, name), s in setups.items():
        engines += [{"name": f"{arch}|{name}|{k}", "path": str(s.export), "impl": IMPLS[k],
                     "prompts": [r[0] for r in rows[(arch, name)]]} for k in cases[(arch, name)][2]]
    for arch, path in bases.items():  # each base scores every bake's rows of its architecture
        own = [r[0] for (a, _), rs in rows.items() if a == arch for r in rs]
        engines += [{"name": f"{arch}|base|{k}", "path": str(path), "impl": IMPLS[k], "prompts": own}
                    for k in impls_of[arch]]
    res = score_token_ids(engines, [], python=python, timeout=3000, log=log, keep_going=True)
    got = {}
    for (arch, name), s in setups.items():
        r = rows[(arch, name)]
        offset = base_offset(rows, (arch, name))
        runs, errors = {}, {}
        for k in cases[(arch, name)][2]:
            e_bake, e_base = res["engines"][f"{arch}|{name}|{k}"], res["engines"][f"{arch}|base|{k}"]
            if "error" in e_bake or "error" in e_base:
                errors[k] = e_bake.get("error") or e_base.get("error")
                continue
            runs[k] = (e_bake["prompts"], e_base["prompts"][offset:offset + len(r)])
        verdict = None
        if runs:
            tf = {"steered": tf_scores(s.base, r, s.ref.context(s.base)), "base": tf_scores(s.base, r),
                  "bake": tf_scores(load_model(s.export), r)}
            verdict = _verdict(s, r, runs, tf, res)
            log(f"FIGURE sglang {arch} {name}: {verdict.status} {verdict.message}")
        for k, msg in errors.items():
            log(f"FIGURE sglang {arch} {name} {k}: failed to load: {msg[-400:]}")
        got[(arch, name)] = {"verdict": verdict, "errors": errors, "setup": s}
    return got


# session, not module: xdist interleaves other modules' tests with these, and a module fixture
# would then be torn down and the engines run again
@pytest.fixture(scope="session")
def sglang_runs(tmp_path_factory):
    try:
        python = find_sglang_python()
    except Exception as e:
        pytest.fail(f"the sglang tests need sglang's venv: {e}")
    return run_cases(CASES, tmp_path_factory.mktemp("sglang-arch"), python)


@pytest.mark.parametrize("case", list(CASES), ids=[f"{a}-{n}" for a, n in CASES])
def test_sglang_verdict(case, sglang_runs):
    """Per implementation: an exact bake matches transformers runtime steering (or ablation), an
    approximate one the bake in transformers; a route sglang does not build is caught as lost; an
    architecture sglang cannot start fails to load with the recorded error."""
    want = CASES[case][2]
    got = sglang_runs[case]
    v, errors = got["verdict"], got["errors"]
    for impl, expected in want.items():
        if expected.startswith("error:"):
            assert impl in errors and expected[len("error:"):].strip() in errors[impl], errors
            continue
        assert impl not in errors, errors
        d = v.details[impl]
        # the untouched model: sglang and transformers agree to float rounding (the noise floor)
        floor = d["noise_floor_base_sglang_vs_transformers"]
        assert floor["top1"] >= 0.99 and floor["mean_abs_logprob_gap"] < 1e-3, floor
        # the edit matters: far above the floor
        assert d["unedited_vs_target"]["mean_abs_logprob_gap"] > max(1e-3, 100 * floor["mean_abs_logprob_gap"])
        if expected == "pass":
            assert d["passed"], v.message
        else:
            assert not d["passed"] and d["lost"], v.message
            assert d["bake_vs_base_in_sglang"]["mean_abs_logprob_gap"] < 1e-4, v.message
