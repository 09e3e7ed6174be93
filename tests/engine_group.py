"""The hook that keeps the engine tests in one xdist group (``--dist loadgroup``), so that two
engines never run at once: each takes every core, and two together thrash and time out.
tests/conftest.py installs it; tests/test_tiers.py runs it under real xdist."""

from __future__ import annotations

import pytest

ENGINE_MARKS = ("vllm", "sglang", "llamacpp")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook writes the groups into the node ids
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if any(item.get_closest_marker(m) for m in ENGINE_MARKS):
            item.add_marker(pytest.mark.xdist_group("engines"))
