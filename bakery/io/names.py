"""Checkpoint tensor names, resolved the way transformers resolves them on load.

bakery's architecture table (:mod:`bakery.arch`) names tensors as the transformers model does:
``transformer.h.1.mlp.c_proj.weight``, ``model.layers.3.mlp.experts.down_proj``. Checkpoints do
not always store them so, and transformers 5.24 maps them on load
(``transformers.core_model_loading.rename_source_key``):

- the **base-model prefix** (``base_model_prefix``: ``transformer`` for GPT-2, ``model`` for Llama,
  ``gpt_neox``): a checkpoint of the base model, such as GPT-2 as published (``h.1.*``,
  ``wte.weight``), leaves it out, and transformers adds it;
- **older layouts** renamed by ``conversion_mapping.py``: Mixtral's ``block_sparse_moe`` -> ``mlp``;
- **experts**: transformers fuses one ``nn.Linear`` weight per expert
  (``mlp.experts.{e}.down_proj.weight``, Mixtral ``w2``) into a 3-D parameter on load and splits
  it again on save; gpt-oss checkpoints store the fused tensors.

:class:`TensorNames` answers, for a model-side name, which checkpoint tensor holds it, and for a
tensor to add (a new bias), the name the checkpoint's own style gives it, so that an export keeps
the naming of its source. What it cannot resolve is a :class:`TensorNameError` that says what was
looked for, never a bare ``KeyError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from bakery.errors import BakeryError
from bakery.arch import ArchSpec, cfg_get, text_config_of


class TensorNameError(BakeryError):
    """A tensor the architecture table expects is not in the checkpoint under any name that
    transformers would accept for it."""


@dataclass(frozen=True)
class Writer:
    """A checkpoint tensor that writes the residual stream. ``axis``: the axis that indexes the
    hidden size (0 for an ``nn.Linear`` weight ``[hidden, in]``, 1 for GPT-2's Conv1D and for an
    embedding, 1 or 2 for fused experts, the last one for a bias)."""

    name: str
    axis: int
    kind: str  # "embed", "attn", "mlp", "expert", "shared", "bias"
    expert: int | None = None


class TensorNames:
    """Model-side names <-> the names of one checkpoint (its tensor names ``keys``)."""

    def __init__(self, keys: Iterable[str], spec: ArchSpec, config: Any = None):
        self.keys = set(keys)
        self.spec = spec
        self.config = config
        p = spec.base_prefix
        # the checkpoint's own style: with or without the base-model prefix, older layouts or not
        self.prefixed = not p or any(k.startswith(p + ".") for k in self.keys) or not self.keys
        self.renames = [(m, c) for m, c in spec.renames if any(c in k for k in self.keys)]

    # ---- single tensors ---------------------------------------------------------------------
    def to_checkpoint(self, name: str) -> str:
        """The name ``name`` has (or would have, for a tensor to add) in this checkpoint's style."""
        out = name
        for model_part, ckpt_part in self.renames:
            out = out.replace(model_part, ckpt_part)
        p = self.spec.base_prefix
        if not self.prefixed and out.startswith(p + "."):
            out = out[len(p) + 1:]
        return out

    def candidates(self, name: str) -> list[str]:
        """Every name transformers would load as ``name``, most likely first."""
        p = self.spec.base_prefix
        forms = [name]
        for model_part, ckpt_part in self.spec.renames:
            forms += [f.replace(model_part, ckpt_part) for f in forms if model_part in f]
        out: list[str] = [self.to_checkpoint(name)]
        for f in forms:
            out.append(f)
            if p and f.startswith(p + "."):
                out.append(f[len(p) + 1:])
        return list(dict.fromkeys(out))

    def find(self, name: str) -> str | None:
        """The checkpoint tensor that holds model tensor ``name`` (or ``name`` itself), or None."""
        if name in self.keys:
            return name
        return next((c for c in self.candidates(name) if c in self.keys), None)

    def resolve(self, name: str) -> str:
        """Like :meth:`find`, but a clear error when the checkpoint has no such tensor."""
        found = self.find(name)
        if found is None:
            raise TensorNameError(self._missing(name))
        return found

    def _missing(self, name: str) -> str:
        tried = ", ".join(self.candidates(name))
        sample = ", ".join(sorted(self.keys)[:3])
        p = self.spec.base_prefix
        how = f"with or without the base-model prefix '{p}.'" if p else "as named"
        return (f"the checkpoint has no tensor for {name} (looked for {tried}: {how}, as transformers "
                f"loads a {self.spec.model_type} checkpoint). Its tensors are named like: {sample}. "
                "Is this checkpoint the architecture its config.json says? If transformers loads it, "
                "please report the names to bakery.")

    def bias_of(self, weight: str) -> str:
        """Checkpoint name of the bias that goes with checkpoint weight ``weight``."""
        return weight[: -len("weight")] + "bias" if weight.endswith(".weight") else weight + "_bias"

    # ---- the residual writers ---------------------------------------------------------------
    def embeddings(self) -> list[Writer]:
        return [Writer(self.resolve(f"{e}.weight"), 1, "embed") for e in self.spec.embeddings]

    def _linear(self, module: str, kind: str) -> list[Writer]:
        w = self.resolve(f"{module}.weight")
        out = [Writer(w, 1 if self.spec.conv1d else 0, kind)]
        b = self.find(f"{module}.bias")
        if b is not None:
            out.append(Writer(b, 0, "bias"))
        return out

    def num_experts(self) -> int:
        """Experts per block, from config.json (transformers writes Qwen3-MoE's ``num_experts``
        as ``num_local_experts``, its attribute map's other name: both are read)."""
        ex = self.spec.experts
        for key in (ex.count_key, "num_experts", "num_local_experts") if ex else ():
            n = cfg_get(text_config_of(self.config or {}), key)
            if n:
                return int(n)
        raise TensorNameError(f"config.json has no {ex.count_key if ex else 'expert count'}: "
                              "bakery cannot tell how many experts each block has")

    def mlp_writers(self, i: int) -> list[Writer]:
        """Block ``i``'s MLP writes: its down-projection, or every expert's and the shared expert's."""
        spec, b = self.spec, self.spec.block(i)
        ex = spec.experts
        if ex is None:
            return self._linear(f"{b}.{spec.mlp_out}", "mlp")
        if ex.dense and self.find(f"{b}.{ex.dense}") is not None:  # a plain MLP block
            return self._linear(f"{b}.{ex.dense[: -len('.weight')]}", "mlp")
        out: list[Writer] = []
        fused = self.find(f"{b}.{ex.fused}")
        if fused is not None:
            out.append(Writer(fused, ex.out_axis, "expert"))
        elif ex.per_expert:
            for e in range(self.num_experts()):
                out.append(Writer(self.resolve(f"{b}.{ex.per_expert.format(e=e)}"), 0, "expert", e))
        else:
            raise TensorNameError(self._missing(f"{b}.{ex.fused}"))
        if ex.bias:
            out.append(Writer(self.resolve(f"{b}.{ex.bias}"), 1, "bias"))
        for s in ex.shared:
            out += [Writer(w.name, w.axis, "shared" if w.kind == "mlp" else w.kind)
                    for w in self._linear(f"{b}.{s[: -len('.weight')]}", "mlp")]
        return out

    def attn_writers(self, i: int) -> list[Writer]:
        spec = self.spec
        return self._linear(f"{spec.block(i)}.{spec.attn_out_for(self.config or {}, i)}", "attn")

    def block_writers(self, i: int) -> list[Writer]:
        """Every checkpoint tensor whose output block ``i`` adds to the residual stream."""
        return self.attn_writers(i) + self.mlp_writers(i)
