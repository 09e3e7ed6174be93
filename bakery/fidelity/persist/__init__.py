"""Persona persistence: does a steered persona outlast the steering?

For each prompt the model generates ``N`` tokens with runtime steering at layer ``L`` (positions
all), then ``M`` more from the same KV cache without steering. At every generated token it records
the scalar projection ``(h . v) / |v|`` of the hidden state at row ``L`` (the output of block
``L-1``, as the next block reads it, so it includes the steering term while steering is on) onto
the vector ``v = v[L]``. One forward call per new token; the sequence is never re-traced.

Token ``t`` is recorded at the position that produced it: the first generated token's projection
is the hidden state at the last prompt position, token ``t``'s at the position of token ``t-1``.
So the ``N`` steered tokens are exactly those sampled from steered hidden states, and a full
forward pass over the final sequence with steering on positions ``< P + N - 1`` reproduces every
recorded number.

Reference traces in the same run, with the same random numbers: the unsteered model throughout,
the model steered throughout and, optionally, a baked checkpoint loaded with plain transformers.

The work is split by job: ``settings`` (what a run is), ``trace`` (the KV-cached traces),
``summary`` (means and half-life), ``run`` (the whole run), ``outputs`` (files and plot). The
names below are the public API.
"""

from bakery.fidelity.persist.outputs import load_result, plot, texts_markdown, write_outputs
from bakery.fidelity.persist.run import recipe_questions, run_persist
from bakery.fidelity.persist.settings import (BAKED, CONDITIONS, DEFAULT_PROMPTS, STEERED, SWITCH, UNSTEERED,
                                              PersistError, PersistResult, PersistSettings, Trace)
from bakery.fidelity.persist.summary import format_summary, half_life, summarize
from bakery.fidelity.persist.trace import BatchTrace, check_vector_for_persist, logits_kwargs, run_condition, trace_batch

__all__ = [
    "BAKED", "CONDITIONS", "DEFAULT_PROMPTS", "STEERED", "SWITCH", "UNSTEERED", "BatchTrace", "PersistError",
    "PersistResult", "PersistSettings", "Trace", "check_vector_for_persist", "format_summary", "half_life",
    "load_result", "logits_kwargs", "plot", "recipe_questions", "run_condition", "run_persist", "summarize",
    "texts_markdown", "trace_batch", "write_outputs",
]
