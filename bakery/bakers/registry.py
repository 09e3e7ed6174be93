"""The registry of bake methods: a baker module registers its class with ``@register("name")``.

The baker modules import this module, never the package that aggregates them
(:mod:`bakery.bakers` imports them so that they register)."""

from __future__ import annotations

from typing import Any, Callable

from bakery.bakers.errors import BakeError

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a baker available as ``--method name``."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        cls.name = name
        cls.config_class.method = name
        return cls

    return deco


def available() -> list[str]:
    """Registered method names, in the order they were registered."""
    return list(_REGISTRY)


def config_classes() -> dict[str, type]:
    """Each method's config class."""
    return {name: cls.config_class for name, cls in _REGISTRY.items()}


def get_baker(name: str):
    """An instance of the method registered as ``name``."""
    if name not in _REGISTRY:
        raise BakeError(f"unknown bake method '{name}'; available: {', '.join(available())}")
    return _REGISTRY[name]()


def make_config(method: str, options: dict[str, Any], *, how: str = "option"):
    """``method``'s typed config from ``{name: value}``; an option it does not take is an error
    naming the methods that do."""
    return get_baker(method).config_class.from_options(options, others=config_classes(), how=how)


def coef_message(method: str, uses_coef: bool, where: str = "") -> str:
    """The error for a missing strength (bias, kl-*) or a strength a method ignores (ortho)."""
    at = f" ({where})" if where else ""
    if uses_coef:
        return (f"--coef is required for --method {method}{at}: the steering strength, e.g. the one "
                "`bakery sweep` recommends (pass --coef C, or coef: C in the recipe term)")
    takers = " / ".join(n for n, c in _REGISTRY.items() if c.uses_coef)
    return (f"--coef is for --method {takers}; --method {method} takes no strength{at} "
            "(ortho removes the direction; use --add C to re-add it at a fixed value)")
