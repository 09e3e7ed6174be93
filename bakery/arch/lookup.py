"""The facts of a given config: :func:`spec_for` (a multimodal wrapper gets its text tower's entry,
placed where the wrapper keeps it) and what follows from them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bakery.arch.config import cfg_get
from bakery.arch.spec import ArchSpec, UnsupportedArchitecture
from bakery.arch.table import ARCHITECTURES


@dataclass(frozen=True)
class Wrapper:
    """A multimodal ``...ForConditionalGeneration`` checkpoint whose text tower is a table entry.

    ``text_prefix``: where the language model sits in the transformers 5.24 module tree;
    ``renames``: the older checkpoint layout that transformers still writes for some of them
    (Gemma 3: ``language_model.model.*``, ``language_model.lm_head``), mapped like any rename."""

    text_prefix: str = "model.language_model"
    renames: tuple[tuple[str, str], ...] = ()


WRAPPERS: dict[str, Wrapper] = {
    "qwen3_5": Wrapper(),
    "qwen3_5_moe": Wrapper(),
    "gemma3": Wrapper(renames=(("model.language_model.", "language_model.model."),
                               ("lm_head.", "language_model.lm_head."))),
}


def auto_class(config: Any) -> str:
    """The transformers Auto class that loads a checkpoint whole: a multimodal wrapper's text-only
    ``AutoModelForCausalLM`` load would drop its vision tower."""
    return "AutoModelForImageTextToText" if cfg_get(config, "model_type") in WRAPPERS else "AutoModelForCausalLM"


def _wrap(inner: ArchSpec, model_type: str, w: Wrapper) -> ArchSpec:
    """The text tower's facts at its place inside the wrapper (``model.layers`` ->
    ``model.language_model.layers``); the output head stays ``lm_head``."""
    def moved(path: str) -> str:
        return w.text_prefix + path[len("model"):] if path.startswith("model.") else path
    return replace(inner, model_type=model_type, blocks=moved(inner.blocks),
                   embeddings=tuple(moved(e) for e in inner.embeddings),
                   final_norm=moved(inner.final_norm), renames=(*inner.renames, *w.renames),
                   text_prefix=w.text_prefix)


def spec_for(config: Any) -> ArchSpec:
    """The table entry for a config (object or dict), or a clear error naming what is supported.
    A multimodal wrapper gets its text tower's entry, placed where the wrapper keeps it."""
    mt = cfg_get(config, "model_type")
    text = cfg_get(config, "text_config")
    if text is not None:
        w = WRAPPERS.get(mt)
        inner_mt = cfg_get(text, "model_type")
        if w is None or inner_mt not in ARCHITECTURES:
            raise UnsupportedArchitecture(
                f"model_type '{mt}' is a multimodal wrapper (its language model sits under text_config) "
                f"that bakery has no facts for. Wrappers bakery bakes the text tower of: "
                f"{', '.join(sorted(WRAPPERS))}. Otherwise use the text-only variant of the model "
                "(for Gemma 3: a gemma3_text checkpoint) or extract its language model.")
        return _wrap(ARCHITECTURES[inner_mt], mt, w)
    try:
        return ARCHITECTURES[mt]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"bakery has no architecture facts for model_type '{mt}'. Supported: {known} (and the "
            f"text towers of {', '.join(sorted(WRAPPERS))}). "
            "Add an entry to bakery/arch/table.py (block path, residual writers, norm style, bias routes) "
            "rather than letting bakery guess."
        ) from None


def is_parallel_residual(spec: ArchSpec, config: Any) -> bool:
    if spec.parallel_residual_key is None:
        return False
    return bool(cfg_get(config, spec.parallel_residual_key, True))


