"""Per-architecture facts: where the blocks live, what writes the residual stream, which bias
routes exist and which engines keep them.

Every other module asks these facts instead of guessing from module names: the shapes are in
:mod:`~bakery.arch.spec`, the table in :mod:`~bakery.arch.table`, the lookup of a config in
:mod:`~bakery.arch.lookup`, config reading in :mod:`~bakery.arch.config`. Names are the
transformers model's own parameter names (``model.layers.3.mlp.down_proj.weight``). A checkpoint
may store them differently (no base-model prefix, per-expert tensors, legacy module names):
:mod:`bakery.io.names` maps one to the other, from the facts kept here.
"""

from bakery.arch.config import (cfg_get, hidden_size_of, num_layers_of, set_text_key, text_config_of,
                                tied_embeddings)
from bakery.arch.lookup import WRAPPERS, Wrapper, auto_class, is_parallel_residual, spec_for
from bakery.arch.spec import ENGINES, ArchSpec, BiasRoute, Experts, UnsupportedArchitecture
from bakery.arch.table import ARCHITECTURES

__all__ = ["ARCHITECTURES", "ENGINES", "WRAPPERS", "ArchSpec", "BiasRoute", "Experts", "UnsupportedArchitecture",
           "Wrapper", "auto_class", "cfg_get", "hidden_size_of", "is_parallel_residual", "num_layers_of",
           "set_text_key", "spec_for", "text_config_of", "tied_embeddings"]
