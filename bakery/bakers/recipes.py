"""Bake recipes: one bake as a YAML file (built-in ones in ``bakery/recipes/bakes/*.yaml``).

```yaml
name: pirate-bias                # optional, for people
description: ...                 # optional
model: smollm2-135m-instruct     # optional (default model otherwise)
method: bias                     # bias | ortho | kl-lora | kl-full
output: exports/pirate-bias      # optional
terms:                           # one or more edits; or trait/vector/layer/coef at top level
  - {trait: pirate, layer: 16, coef: 2.0}
  - {vector: vectors/formal.safetensors, layer: 12, coef: -1.5}
options: {route: bias, site: resid-out, target_engines: "transformers,vllm"}
```

``options`` are the method's config (:mod:`bakery.bakers.config`): an option the method does not
take is refused when the bake starts. An option may also stand at the top level.
A ``vector`` path is read relative to the recipe's folder when it exists there, else as given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bakery.errors import BakeryError

BAKES_DIR = Path(__file__).resolve().parents[1] / "recipes" / "bakes"  # package data: in the wheel too
TOP = {"name", "description", "model", "method", "output", "terms", "options", "trait", "vector",
       "layer", "coef"}
TERM_KEYS = {"trait", "vector", "layer", "coef"}


def option_keys() -> set[str]:
    """Every option any method's config takes."""
    from bakery.bakers.registry import config_classes

    return set().union(*(c.option_names() for c in config_classes().values()))


class BakeRecipeError(BakeryError):
    """A bake recipe that is missing or malformed."""


@dataclass
class TermSpec:
    layer: int
    coef: float | None = None  # None: not given; bias/kl-lora/kl-full refuse it, ortho needs none
    trait: str | None = None
    vector: str | None = None


@dataclass
class BakeRecipe:
    method: str
    terms: list[TermSpec]
    model: str | None = None
    output: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    description: str | None = None
    source: str = ""


def _num(v: Any, what: str, kind=float):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise BakeRecipeError(f"{what} must be {'an integer' if kind is int else 'a number'}; got {v!r}")
    return kind(v)


def _term(d: Any, where: str, base: Path | None) -> TermSpec:
    if not isinstance(d, dict):
        raise BakeRecipeError(f"{where}: a term is a mapping with layer, coef and trait or vector")
    unknown = set(d) - TERM_KEYS
    if unknown:
        raise BakeRecipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                              f"(allowed: {', '.join(sorted(TERM_KEYS))})")
    if "layer" not in d:
        raise BakeRecipeError(f"{where}: missing 'layer' (row L of the vector: output of block L-1)")
    vec = d.get("vector")
    if vec is not None:
        vec = str(vec)
        if base is not None and not Path(vec).is_absolute() and (base / vec).exists():
            vec = str(base / vec)
    trait = d.get("trait")
    if trait is None and vec is None:
        raise BakeRecipeError(f"{where}: give 'trait' (a cached extraction) or 'vector' (a file)")
    return TermSpec(layer=_num(d["layer"], f"{where}.layer", int),
                    coef=_num(d["coef"], f"{where}.coef") if d.get("coef") is not None else None,
                    trait=str(trait) if trait is not None else None, vector=vec)


def from_dict(data: Any, *, where: str = "bake recipe", base: Path | None = None) -> BakeRecipe:
    """Validate a recipe dict; every problem named with the key it concerns."""
    if not isinstance(data, dict):
        raise BakeRecipeError(f"{where}: the top level must be a mapping (method, terms, ...)")
    allowed = option_keys()
    unknown = set(data) - TOP - allowed
    if unknown:
        raise BakeRecipeError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                              f"(allowed: {', '.join(sorted(TOP | allowed))})")
    method = data.get("method")
    if not isinstance(method, str):
        raise BakeRecipeError(f"{where}: 'method' is required (bias, ortho, kl-lora, kl-full)")
    flat = {k: data[k] for k in TERM_KEYS if k in data}
    if "terms" in data and flat:
        raise BakeRecipeError(f"{where}: give either 'terms' or top-level {', '.join(flat)}, not both")
    raw_terms = data.get("terms") if "terms" in data else ([flat] if flat else [])
    if not isinstance(raw_terms, list):
        raise BakeRecipeError(f"{where}: 'terms' must be a list of mappings")
    terms = [_term(t, f"{where}: terms[{i}]", base) for i, t in enumerate(raw_terms)]
    opts = data.get("options") or {}
    if not isinstance(opts, dict):
        raise BakeRecipeError(f"{where}: 'options' must be a mapping")
    opts = {**opts, **{k: data[k] for k in allowed if k in data}}
    bad = set(opts) - allowed
    if bad:
        raise BakeRecipeError(f"{where}: unknown option(s) {', '.join(sorted(bad))} "
                              f"(allowed: {', '.join(sorted(allowed))})")
    if isinstance(opts.get("target_engines"), list):
        opts["target_engines"] = ",".join(map(str, opts["target_engines"]))
    for key in ("model", "output", "name", "description"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise BakeRecipeError(f"{where}: '{key}' must be a string")
    return BakeRecipe(method=method, terms=terms, model=data.get("model"), output=data.get("output"),
                      options=opts, name=data.get("name"), description=data.get("description"),
                      source=where)


def available_bakes(directory: Path | None = None) -> list[str]:
    d = directory or BAKES_DIR
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_bake_recipe(path_or_name: str | os.PathLike) -> BakeRecipe:
    """A bake recipe from a YAML path or a built-in name (``bakery/recipes/bakes/NAME.yaml``)."""
    import yaml

    p = Path(path_or_name).expanduser()
    if not p.is_file():
        cand = BAKES_DIR / f"{path_or_name}.yaml"
        if cand.is_file() and os.sep not in str(path_or_name):
            p = cand
        else:
            raise BakeRecipeError(f"bake recipe not found: {path_or_name} (built-in: "
                                  f"{', '.join(available_bakes()) or 'none'})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise BakeRecipeError(f"{p} is not valid YAML: {e}") from e
    return from_dict(data, where=str(p), base=p.parent)


def vector_for_trait(trait: str, model: str | os.PathLike | None) -> Path:
    """The cached extracted vector of ``trait`` for ``model``, or an error that lists the trait
    recipes and the cached vectors and says how to extract one."""
    from bakery.traits import available_traits

    from bakery.extraction.extract import cached_vector, list_cached

    found = cached_vector(trait, model)
    if found is not None:
        return Path(found)
    recipes = available_traits()
    cached = sorted({t for t, _ in list_cached(model)})
    how = (f"run `bakery extract --recipe {trait}` first" if trait in recipes else
           f"no trait recipe named '{trait}' either (write one with bakery recipe new)")
    raise BakeRecipeError(
        f"no extracted vector for trait '{trait}' and model '{model or 'default'}': {how}, or pass "
        f"--vector FILE. Trait recipes: {', '.join(recipes) or 'none'}. Cached vectors for this "
        f"model: {', '.join(cached) or 'none'}.")


def no_vector_error(model: str | os.PathLike | None) -> BakeRecipeError:
    """The error for a bake with neither --vector, --trait nor --recipe."""
    from bakery.traits import available_traits

    from bakery.extraction.extract import list_cached

    cached = [f"{t} ({p})" for t, p in list_cached(model)]
    return BakeRecipeError(
        "nothing to bake: pass --vector FILE, --trait NAME (an extracted vector from the cache) or "
        f"--recipe FILE. Trait recipes: {', '.join(available_traits()) or 'none'} (extract one "
        f"with `bakery extract --recipe NAME`). Cached vectors for this model: "
        f"{', '.join(cached) or 'none'}. Bake recipes: {', '.join(available_bakes()) or 'none'}.")
