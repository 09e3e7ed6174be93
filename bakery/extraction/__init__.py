"""Trait recipes, recipe generation, the judge, activation capture, diagnostics and the sweep."""
