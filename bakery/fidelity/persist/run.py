"""A whole persistence run: load the model (and a bake), trace every condition, summarise."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from bakery.fidelity.persist.settings import (BAKED, STEERED, SWITCH, UNSTEERED, PersistError, PersistResult,
                                              PersistSettings, Trace)
from bakery.fidelity.persist.summary import summarize
from bakery.fidelity.persist.trace import check_vector_for_persist, run_condition
from bakery.naming import describe_layer
from bakery.vectors.artifact import VectorError
from bakery.vectors.load import load_vector


def run_persist(prompts: Sequence[str], settings: PersistSettings, *, vector_path: str | os.PathLike,
                model: str | os.PathLike | None = None, export: str | os.PathLike | None = None,
                trust_remote_code: bool = False, progress: bool = True,
                device: str | None = None, dtype: str | None = None) -> PersistResult:
    """Trace every condition for every prompt and seed (see ``bakery.fidelity.persist``);
    ``device``/``dtype`` place the models (default: the process-wide placement)."""
    from tqdm.auto import tqdm

    from bakery.models import load_model, load_tokenizer, resolve_model

    settings.validate()
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise PersistError("no prompts: give --prompts FILE (one per line), --recipe or --prompt TEXT")
    if not Path(vector_path).is_file():  # fail before loading any model
        raise VectorError(f"vector file not found: {vector_path}")
    path = resolve_model(model)
    export_path = resolve_model(export) if export is not None else None
    lm = load_model(path, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if settings.batch_size is None:
        settings = replace(settings, batch_size=_auto_batch(lm, tok, prompts, settings))
    vec = load_vector(vector_path, num_layers=lm.config.num_hidden_layers)
    direction = check_vector_for_persist(vec, lm.config, settings.layer)
    if export_path is not None:
        from transformers import AutoConfig

        vec.check_model(AutoConfig.from_pretrained(export_path, trust_remote_code=trust_remote_code))
    norm = float(direction.norm())
    conds = [UNSTEERED, SWITCH, STEERED] + ([BAKED] if export_path else [])
    steps = len(conds) * len(settings.seeds) * math.ceil(len(prompts) / settings.batch_size) * settings.total_tokens
    traces: list[Trace] = []
    with tqdm(total=steps, desc="persist", unit="tok", disable=not progress) as bar:
        for cond in (UNSTEERED, SWITCH, STEERED):
            traces += run_condition(lm, tok, prompts, settings, condition=cond, direction=direction,
                                    vector_norm=norm, progress=bar)
        if export_path is not None:
            del lm
            baked = load_model(export_path, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
            btok = (load_tokenizer(export_path, trust_remote_code=trust_remote_code)
                    if (Path(export_path) / "tokenizer_config.json").is_file() else tok)
            # the bake's own trace: plain transformers, no hook; its steering term is assumed to be
            # coef * v at this layer (exact for a bias bake) when computing the "own" component
            bt = run_condition(baked, btok, prompts, settings, condition=BAKED, direction=direction,
                               vector_norm=norm, progress=bar)
            for tr in bt:
                tr.injected = [settings.coef * norm] * len(tr.injected)
            traces += bt
    info = {"model": str(path), "vector": str(vector_path), "trait": vec.trait,
            "export": str(export_path) if export_path else None,
            "layer_meaning": describe_layer(settings.layer)}
    result = PersistResult(settings, info, traces)
    result.summary = summarize(traces, settings, norm)
    return result


def _auto_batch(model, tok, prompts: Sequence[str], settings: PersistSettings) -> int:
    from bakery.placement import auto_batch_size, input_device, model_dtype
    from bakery.steering.generation import render_chat

    longest = max(len(tok(render_chat(tok, p, settings.system), add_special_tokens=False)["input_ids"])
                  for p in prompts)
    return auto_batch_size(model.config, longest + settings.total_tokens, default=8,
                           device=input_device(model), dtype=model_dtype(model))


def recipe_questions(path_or_name: str) -> list[str]:
    """The eval questions of a trait recipe (a YAML file or a name in bakery/recipes/traits/)."""
    from bakery.traits import load_trait_recipe

    questions = list(load_trait_recipe(path_or_name).eval_questions)
    if not questions:
        raise PersistError(f"trait recipe {path_or_name} has no eval questions")
    return [str(q) for q in questions]
