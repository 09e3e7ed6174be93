"""Helpers the tests share: small vectors and bakes of the tiny models (by bakery's bakers, or by
hand where no baker writes them: a broken or weakened bake), strict reloads, and fidelity on
held-out prompts."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bakery.bakers.errors import BakeError
from bakery.fidelity.metrics import measure, model_scorer, sample_trajectories
from bakery.io.checkpoint import ShardedWriter
from bakery.io.manifest import BakeTerm, Manifest
from bakery.models import config_hash, load_model, load_tokenizer, read_config
from bakery.steering.generation import render_chat
from bakery.steering.hooks import steer
from bakery.vectors.artifact import VectorArtifact

ROOT = Path(__file__).resolve().parents[1]  # the checkout

TINY_PROMPTS = ["hello sea", "the quick fox", "tell me about ships", "why is water wet"]

HELD_OUT_TINY = ["Tell me about the sea and the ships.", "What is the capital of France?",
            "Arr, where is the treasure?", "How do I cook rice with water and salt?"]

IDS = torch.tensor([[5, 17, 42, 99, 7, 130, 64, 3, 250, 12], [8, 8, 19, 200, 31, 77, 150, 9, 2, 111]])

HELD_OUT_SMOL = ["What is your favourite season and why?", "How do I make a cup of tea?",
                 "Tell me about elephants.", "Describe a sunset over the sea."]


def fail_after(monkeypatch, limit: int, make_error) -> None:
    """Simulate the environment: the output device takes ``limit`` bytes, then every write and
    kernel copy raises ``make_error()`` (a full disk, a Ctrl-C)."""
    used = [0]
    write, copy = ShardedWriter._write, ShardedWriter._copy

    def spend(n: int) -> None:
        used[0] += n
        if used[0] > limit:
            raise make_error()

    def _write(self, fh, data):
        spend(memoryview(data).nbytes)
        write(self, fh, data)

    def _copy(self, src, fh, offset, length):
        spend(length)
        copy(self, src, fh, offset, length)

    monkeypatch.setattr(ShardedWriter, "_write", _write)
    monkeypatch.setattr(ShardedWriter, "_copy", _copy)


def real_bake(method: str, src: Path, vec: VectorArtifact, layer: int, coef: float, out: Path, **options) -> Path:
    """A bake by bakery's own baker (the vector saved next to it first)."""
    from bakery.bakers import bake

    vpath = vec.save(Path(out).parent / f"{Path(out).name}-vector.safetensors")
    return bake(method, src, [(vpath, layer, coef)], out, progress=False, **options)


def _copy_model(src: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "README.md":
            shutil.copy(f, out / f.name)
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _write_export(src: Path, out: Path, sd: dict, cfg: dict, vec: VectorArtifact, manifest: Manifest) -> Path:
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    vec.save(out / "vectors" / "trait.safetensors")
    manifest.save(out)
    (out / "README.md").write_text("# a hand-made bake\n")
    return out


def make_bias_bake(src: Path, vec: VectorArtifact, layer: int, coef: float, out: Path, *,
                   broken: bool = False) -> Path:
    """Llama ``mlp_bias`` bake by hand: zeros for every gate/up/down bias except
    ``down_proj.bias`` of block ``layer-1`` = coef * v[layer]. ``broken``: only that tensor,
    config flag left off (the silent-loss failure every engine must be checked for)."""
    src, out = Path(src), Path(out)
    sd = _copy_model(src, out)
    cfg = read_config(src)
    dtype = sd["model.embed_tokens.weight"].dtype
    n = cfg["num_hidden_layers"]
    if not broken:
        cfg["mlp_bias"] = True
        for i in range(n):
            for p in ("gate_proj", "up_proj", "down_proj"):
                w = sd[f"model.layers.{i}.mlp.{p}.weight"]
                sd[f"model.layers.{i}.mlp.{p}.bias"] = torch.zeros(w.shape[0], dtype=dtype)
    sd[f"model.layers.{layer - 1}.mlp.down_proj.bias"] = (coef * vec.vectors[layer]).to(dtype)
    m = Manifest(method="bias", terms=[BakeTerm(layer, coef, vec.trait, "vectors/trait.safetensors", vec.sha256())],
                 positions="all", route="mlp-bias", exact=True,
                 source={"model": str(src), "path": str(src), "config_hash": config_hash(read_config(src))})
    return _write_export(src, out, sd, cfg, vec, m)


def make_ortho_bake(src: Path, vec: VectorArtifact, layer: int, out: Path) -> Path:
    """Ortho bake by hand: ``(I - r r^T) W`` on every attention-output and MLP-down weight,
    embeddings kept (reference: ablation without the embedding output)."""
    src, out = Path(src), Path(out)
    sd = _copy_model(src, out)
    cfg = read_config(src)
    r = vec.vectors[layer].float()
    r = r / r.norm()
    for i in range(cfg["num_hidden_layers"]):
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            W = sd[name].float()
            sd[name] = (W - torch.outer(r, r @ W)).to(sd[name].dtype)
    m = Manifest(method="ortho", terms=[BakeTerm(layer, 1.0, vec.trait, "vectors/trait.safetensors", vec.sha256())],
                 route="ortho", exact=True,
                 ablation={"layer": layer, "blocks": "all", "embeddings": "keep", "per_layer": False},
                 source={"model": str(src), "path": str(src), "config_hash": config_hash(read_config(src))})
    return _write_export(src, out, sd, cfg, vec, m)


def random_vector(model_dir: Path, seed: int = 0, scale: float = 1.0) -> VectorArtifact:
    cfg = read_config(model_dir)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(cfg["num_hidden_layers"] + 1, cfg["hidden_size"], generator=g) * scale
    return VectorArtifact(v, {"trait": "random"})


def weakened_copy(export: Path, out: Path, scale: float = 0.95) -> Path:
    """A copy of a bias bake whose non-zero down_proj bias tensors are scaled by ``scale``: loads
    cleanly everywhere, only the size of the edit is wrong (as scripts/weaken_bake.py writes)."""
    shutil.copytree(export, out, ignore=shutil.ignore_patterns("compare"))
    for f in out.glob("*.safetensors"):
        sd = load_file(str(f))
        hit = {k: (v.float() * scale).to(v.dtype) for k, v in sd.items()
               if k.endswith("mlp.down_proj.bias") and bool(v.abs().max() > 0)}
        if hit:
            save_file({**sd, **hit}, str(f), metadata={"format": "pt"})
    return out


def two_vector_bake(model_dir: Path, tmp: Path, name: str = "two") -> Path:
    """A bias bake of two different vectors at two layers (``bakery bake`` with two terms)."""
    from bakery.bakers import bake

    a, b = random_vector(model_dir, seed=11, scale=0.1), random_vector(model_dir, seed=12, scale=0.1)
    a.meta["trait"], b.meta["trait"] = "pirate", "evil"
    pa, pb = a.save(tmp / f"{name}-pirate.safetensors"), b.save(tmp / f"{name}-evil.safetensors")
    return bake("bias", model_dir, [(pa, 2, 3.0), (pb, 3, -2.0)], tmp / name, progress=False)


def held_out_fidelity(src, out, v, layer, coef):
    """Fidelity of the reloaded bake ``out`` to runtime steering on the held-out prompts."""
    base, baked, tok = load_model(src), reload_strict(out), load_tokenizer(src)
    ctx = lambda P: steer(base, v, layer, coef)
    traj = sample_trajectories(base, tok, [render_chat(tok, q) for q in HELD_OUT_TINY], ctx,
                               max_new_tokens=12, batch_size=4)
    return measure(traj, model_scorer(base, ctx), model_scorer(base), {"rank1": model_scorer(baked)})["rank1"]


def vec(model_dir: Path, seed: int = 0, trait: str = "test") -> VectorArtifact:
    cfg = json.loads((model_dir / "config.json").read_text())
    n = cfg.get("num_hidden_layers") or cfg["n_layer"]
    h = cfg.get("hidden_size") or cfg["n_embd"]
    return VectorArtifact(torch.randn(n + 1, h, generator=torch.Generator().manual_seed(seed)),
                          {"trait": trait})


def reload_strict(folder: Path):
    """Stock transformers, no missing or unexpected keys."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@torch.no_grad()
def logits(model, ids=IDS):
    return model(ids).logits


def fidelity_on_smol(base, baked, tok, reference_ctx, prompts=HELD_OUT_SMOL, tokens=32):
    from bakery.fidelity.metrics import measure, model_scorer, sample_trajectories
    from bakery.steering.generation import render_chat

    traj = sample_trajectories(base, tok, [render_chat(tok, q) for q in prompts], reference_ctx,
                               max_new_tokens=tokens, batch_size=len(prompts))
    return measure(traj, model_scorer(base, reference_ctx), model_scorer(base),
                   {"bake": model_scorer(baked)})["bake"]


def base_offset(rows: dict, key: tuple[str, str]) -> int:
    """Where the rows of bake ``key`` = (architecture, name) sit among the rows its architecture's
    base model scores: every bake's of that architecture, in order."""
    offset = 0
    for (arch, name), rs in rows.items():
        if (arch, name) == key:
            break
        if arch == key[0]:
            offset += len(rs)
    return offset


def assert_refused(match: str, method: str, src: Path, terms: list, out: Path, **options) -> None:
    """The bake is refused with an error that matches ``match``, and nothing is written at ``out``."""
    from bakery.bakers import bake

    with pytest.raises(BakeError, match=match):
        bake(method, src, terms, out, progress=False, **options)
    assert not Path(out).exists()
