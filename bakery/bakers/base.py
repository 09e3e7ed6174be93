"""What every baker shares: the request (terms and options), the plan a baker returns (which
tensors change, which are added, the new config, the manifest facts), and the checks that turn
a bad request into a clear error before anything is written."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bakery.errors import BakeryError
from bakery.arch import ENGINES, ArchSpec, BiasRoute, cfg_get, set_text_key, spec_for
from bakery.io.checkpoint import CheckpointReader, TensorInfo
from bakery.io.names import TensorNameError, TensorNames
from bakery.vectors.artifact import VectorArtifact, VectorError

ENGINE_CHOICES = (*ENGINES, "sglang-native")


class BakeError(BakeryError):
    """A bake that cannot be done as asked; the message names what to do instead."""


@dataclass
class Term:
    """One edit: ``coef * vector[layer]`` at the output of block ``layer - 1``."""

    vector: VectorArtifact
    layer: int
    coef: float | None = None  # None: a method without a strength (ortho)
    trait: str | None = None
    vector_path: Path | None = None

    def __post_init__(self) -> None:
        if self.trait is None:
            self.trait = self.vector.trait if self.vector.trait != "unknown" else (
                Path(self.vector_path).stem if self.vector_path else "vector")

    @property
    def block(self) -> int:
        return self.layer - 1

    def row(self) -> torch.Tensor:
        return self.vector.row(self.layer).float()


@dataclass
class BakeRequest:
    """One bake: the resolved model, the terms and the method's typed config (``cfg``)."""

    model_dir: Path
    model_name: str
    config: dict[str, Any]
    terms: list[Term]
    method: str
    cfg: Any  # the method's BakerConfig
    out: Path | None = None  # the final export folder
    command: str = ""

    @property
    def spec(self) -> ArchSpec:
        return spec_for(self.config)

    @property
    def route(self) -> str:
        return getattr(self.cfg, "route", None) or "bias"

    @property
    def site(self) -> str:
        return getattr(self.cfg, "site", None) or "resid-out"

    @property
    def target_engines(self) -> tuple[str, ...]:
        return parse_engines(getattr(self.cfg, "target_engines", None))


# float32 in (its own copy: may edit in place), float32 out; a ``native`` edit keeps any dtype
Edit = Callable[[torch.Tensor], torch.Tensor]


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def refuse_quantized(config: dict[str, Any]) -> None:
    """Bakes edit full-precision weights; a quantized checkpoint's stored values are not them."""
    q = config.get("quantization_config")
    if q:
        kind = q.get("quant_method", "unknown") if isinstance(q, dict) else type(q).__name__
        raise BakeError(
            f"this checkpoint is quantized ({kind}): bakery edits full-precision weights, and an edit "
            "of the stored values would ignore their scales. Bake the unquantized (bf16/fp16/fp32) "
            "checkpoint, then quantize the export.")


@dataclass(kw_only=True)
class BakeFacts:
    """What a baker reports about the weights it wrote: the manifest's and the card's facts."""

    route: str = ""
    site: str = "resid-out"
    positions: str = "all"  # the runtime steering the bake stands for
    exact: bool = False
    engines: dict[str, str] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    card_section: tuple[str, str] | None = None  # (name, markdown) of a baker's own card section


class Weights:
    """What a baker built, ready to be written: :meth:`write` puts the weights and ``config.json``
    into the (temporary) export folder and returns the facts."""

    def write(self, folder: Path, *, progress: bool, max_shard_bytes: int | None) -> BakeFacts:
        raise NotImplementedError


@dataclass(kw_only=True)
class BakePlan(BakeFacts, Weights):
    """A closed-form baker's answer: tensor edits (float32 functions), added tensors and the output
    config, streamed tensor by tensor into the export."""

    reader: CheckpointReader
    config: dict[str, Any]
    edits: dict[str, list[Edit]] = field(default_factory=dict)
    rowwise: set[str] = field(default_factory=set)  # tensors whose edits act on each row alone
    native: set[str] = field(default_factory=set)  # tensors whose edits all take the stored dtype
    added: dict[str, tuple[str, tuple[int, ...], Callable[[], torch.Tensor] | TensorInfo]] = field(default_factory=dict)

    def write(self, folder: Path, *, progress: bool, max_shard_bytes: int | None) -> BakeFacts:
        from bakery.io.export import write_plan

        write_plan(self, folder, progress=progress, max_shard_bytes=max_shard_bytes)
        return self

    def __post_init__(self) -> None:
        refuse_quantized(self.config)
        # the source checkpoint's names, from the source config (a re-hosting bake changes config)
        self.names = TensorNames(self.reader.keys(), spec_for(self.config), dict(self.config))

    def find(self, name: str) -> str | None:
        """The checkpoint (or added) tensor that holds model tensor ``name``, or None."""
        if name in self.added or name in self.reader:
            return name
        found = self.names.find(name)
        if found is not None:
            return found
        own = self.names.to_checkpoint(name)
        return own if own in self.added else None

    def key(self, name: str) -> str:
        """Like :meth:`find`, but a :class:`BakeError` naming what was looked for."""
        found = self.find(name)
        if found is None:
            try:
                self.names.resolve(name)
            except TensorNameError as e:
                raise BakeError(str(e)) from None
        return found

    def _float_source(self, name: str) -> None:
        dtype = self.reader.tensors[name].dtype
        if dtype not in _FLOAT_DTYPES:
            raise BakeError(f"{name} is stored as {dtype}, a quantized or integer type: bakery edits "
                            "full-precision weights. Bake the unquantized checkpoint, then quantize the export.")

    def edit(self, name: str, fn: Edit, *, rowwise: bool = False, native: bool = False) -> None:
        """Queue ``fn`` on tensor ``name`` (a model-side name, resolved to the checkpoint's own
        the way transformers does, or a checkpoint name). ``rowwise``: ``fn`` maps any block of
        rows on its own, so a large tensor can be streamed in blocks (bounded memory). ``native``:
        ``fn`` takes the tensor in any dtype and returns it in that dtype, doing its float32 math
        itself in cache-sized blocks, so the export skips a whole float32 copy of the tensor."""
        name = self.key(name)
        if name in self.added:
            dtype, shape, make = self.added[name]
            base = make if callable(make) else None
            if base is None:
                raise BakeError(f"internal error: cannot edit copied tensor {name}")
            self.added[name] = (dtype, shape, lambda make=make, fn=fn: fn(make().float()))
            return
        self._float_source(name)
        first = name not in self.edits
        for flag, kept in ((rowwise, self.rowwise), (native, self.native)):
            if first and flag:
                kept.add(name)
            elif not flag:
                kept.discard(name)
        self.edits.setdefault(name, []).append(fn)

    def _new_bias(self, name: str, weight: str) -> tuple[str, str]:
        """(checkpoint name for a new bias ``name``, checkpoint name of its ``weight``)."""
        w = self.key(weight)
        return self.names.bias_of(w) if weight.endswith(".weight") else self.names.to_checkpoint(name), w

    def add_bias(self, name: str, delta: torch.Tensor, weight: str, *, conv1d: bool = False) -> None:
        """Add ``delta`` to bias ``name`` (created, in the weight's dtype and named in the
        checkpoint's style, if the checkpoint has none). A fused ``[experts, hidden]`` bias gets
        ``delta`` on every row."""
        delta = delta.detach().float().clone()
        if self.find(name) is not None:
            self.edit(name, lambda b, d=delta: b + d)
            return
        new, weight = self._new_bias(name, weight)
        self._float_source(weight)  # a new bias takes the weight's dtype
        w = self.reader.tensors[weight]
        out = w.shape[1] if conv1d else w.shape[0]
        if delta.shape != (out,):
            raise BakeError(f"vector of size {delta.numel()} does not fit {name} ({out} outputs)")
        self.added[new] = (w.dtype, (out,), lambda d=delta: d.clone())

    def zero_bias(self, name: str, weight: str) -> None:
        """Explicit zeros for a sibling bias that a config flag creates."""
        if self.find(name) is not None:
            return
        if self.find(weight) is None:
            raise BakeError(f"the checkpoint has no {weight}, so bakery cannot size {name}")
        new, weight = self._new_bias(name, weight)
        w = self.reader.tensors[weight]
        self._float_source(weight)
        self.added[new] = (w.dtype, (w.shape[0],), lambda n=w.shape[0]: torch.zeros(n))

    def copy_as(self, name: str, source: str) -> None:
        """A new tensor (named in the checkpoint's style) that is a byte copy of an existing one
        (untying embeddings)."""
        info = self.reader.tensors[self.key(source)]
        self.added[self.names.to_checkpoint(name)] = (info.dtype, info.shape, info)


class Baker:
    """A registered method. ``config_class`` is its one typed config; ``uses_coef``: whether a
    term's strength means anything to it; ``max_terms``: how many terms it can bake at once."""

    name: str = ""
    config_class: type = object
    uses_coef: bool = True
    max_terms: int | None = None

    def name_tags(self, req: BakeRequest) -> tuple[list[str], list[str]]:
        """Words of the default output folder's name before and after ``L{layer}``."""
        return [], []

    def build(self, req: BakeRequest, *, progress: bool) -> Weights | None:
        """The weights to write (``None`` on the non-main processes of a distributed run)."""
        raise NotImplementedError


class ClosedFormBaker(Baker):
    """A baker that edits the checkpoint tensor by tensor: subclasses implement :meth:`plan`."""

    def plan(self, req: BakeRequest, reader: CheckpointReader) -> BakePlan:
        raise NotImplementedError

    def build(self, req: BakeRequest, *, progress: bool) -> Weights:
        return self.plan(req, CheckpointReader(req.model_dir))


# ---- checks shared by the bakers ------------------------------------------------------------
def check_terms(req: BakeRequest) -> None:
    """Every term's vector fits the model and its layer can be baked."""
    if not req.terms:
        raise BakeError("nothing to bake: give a vector (--vector or --trait) with --layer and --coef")
    for t in req.terms:
        where = f" ({t.vector_path})" if t.vector_path else ""
        try:
            t.vector.check_model(req.config)
            t.vector.check_layer(t.layer, for_bake=True)
        except VectorError as e:
            raise BakeError(f"{e}{where}") from e
        if t.coef is not None and not torch.isfinite(torch.tensor(t.coef)):
            raise BakeError(f"coef must be a finite number; got {t.coef}")
        if float(t.row().norm()) == 0:
            raise BakeError(f"row {t.layer} of the vector{where} is all zeros: nothing to bake")


def parse_engines(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"transformers,vllm"`` -> ("transformers", "vllm"); checks the names."""
    if value is None:
        return ENGINES
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [i.strip().lower() for i in items if i.strip()]
    bad = [i for i in items if i not in ENGINE_CHOICES]
    if bad or not items:
        raise BakeError(f"unknown target engine(s) {', '.join(bad) or '(none)'}; choose from "
                        f"{', '.join(ENGINE_CHOICES)} (comma-separated)")
    return tuple(dict.fromkeys(items))


def engine_verdicts(route: BiasRoute) -> dict[str, str]:
    """Verdict per engine for a bias route: ok, drop, or the launch flag that makes it work."""
    return {e: route.engines.get(e, "drop") for e in ENGINES} if route.engines else {e: "ok" for e in ENGINES}


def check_engines(route: BiasRoute, targets: Sequence[str], *, site: str, arch: str,
                  alternatives: str) -> dict[str, str]:
    """Refuse a route that a target engine would silently drop. A verdict that is a launch flag
    (sglang ``--model-impl transformers``) is allowed, unless ``sglang-native`` is demanded."""
    verdicts = engine_verdicts(route)
    problems = []
    for e in targets:
        name = "sglang" if e == "sglang-native" else e
        v = verdicts.get(name, "drop")
        if v == "drop":
            problems.append(route.engine_notes.get(name) or f"{name} would silently drop it")
        elif v != "ok" and e == "sglang-native":
            problems.append(f"sglang keeps it only when launched with {v}")
    if problems:
        alt: list[str] = []
        if site == "resid-out" and route.tensor.endswith("down_proj.bias"):
            alt.append("--site attn-out (the attention-output bias of block L, a different hook "
                       "point that all three engines load natively)")
        dropping = [e for e in ENGINES if verdicts.get(e) == "drop"]
        if dropping:
            keep = [e for e in ENGINES if e not in dropping]
            if keep:
                alt.append(f"--target-engine {','.join(keep)} (leave out {', '.join(dropping)})")
        if "sglang-native" in targets and verdicts.get("sglang") not in ("ok", "drop"):
            alt.append(f"--target-engine transformers,vllm,sglang, and launch sglang with "
                       f"{verdicts['sglang']}")
        alt.append(alternatives)
        raise BakeError(
            f"the {site} bias route on {arch} ({route.tensor}) is not safe for your target engines: "
            f"{'; '.join(problems)}. Alternatives: " + "; ".join(alt))
    return verdicts


def rehost_config(config: dict[str, Any], route: BiasRoute) -> dict[str, Any]:
    """The output config for a route: flags on, and re-hosted as Llama where the route says so."""
    cfg = copy.deepcopy(config)
    if route.rehost_as == "llama":
        src = cfg.get("model_type")
        layer_types = cfg.get("layer_types") or []
        sliding = cfg.get("use_sliding_window", src == "mistral") and cfg.get("sliding_window")
        if sliding or any(t != "full_attention" for t in layer_types):
            raise BakeError(
                f"this {src} model uses sliding-window attention (sliding_window="
                f"{cfg.get('sliding_window')}), so re-hosting it as LlamaForCausalLM to gain an MLP "
                "bias would change its attention: not exact. Use --route rank1 or --method kl-lora.")
        for key in ("use_sliding_window", "max_window_layers", "layer_types", "sliding_window"):
            cfg.pop(key, None)
        cfg["model_type"] = "llama"
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg.setdefault("attention_bias", False)
        cfg.setdefault("mlp_bias", False)
        cfg["bakery_rehosted_from"] = src
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and isinstance(rope, dict) and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]  # legacy key for older loaders (vLLM/sglang)
    for k, v in route.flags.items():  # where the language model reads them (a wrapper's text_config)
        set_text_key(cfg, k, v)
    return cfg


def arch_name(config: dict[str, Any]) -> str:
    archs = cfg_get(config, "architectures") or []
    return archs[0] if archs else str(cfg_get(config, "model_type"))
