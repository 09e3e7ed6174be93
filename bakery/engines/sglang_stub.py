"""Stand-ins for two imports sglang makes that cannot be satisfied on a CPU machine.

Run with ``runpy.run_path`` at interpreter start by the ``.pth`` file that
``scripts/install-sglang.sh`` writes into sglang's venv, when ``BAKERY_SGLANG_STUB`` names this
file (sglang's engine spawns its scheduler in fresh interpreters, which need the stub too). It
imports nothing from bakery.

- ``torchvision``: sglang imports it at module level (multimodal processors); the registry's build
  is CUDA-only.
- ``sgl_kernel``: sglang's CUDA/AMX kernels; ``SGLANG_USE_CPU_ENGINE=1`` imports it. With it
  stubbed, sglang finds none of its ops registered and takes its native torch paths.

Every attribute of a stubbed module is a stub that raises on any call, so a forward that finishes
proves that no stubbed kernel ran. transformers records torchvision as unavailable before the stub
is installed (it asks ``importlib.util.find_spec``, which the stub would answer).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

STUBBED = ("torchvision", "sgl_kernel")


class StubCalled(RuntimeError):
    """Something called into a stubbed package: the run used a kernel that is not there."""


class _Stub:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise StubCalled(f"{self._name} was called, but it is bakery's stand-in for a package that "
                         "cannot run on this machine (bakery/engines/sglang_stub.py)")

    def __repr__(self) -> str:
        return f"<bakery stub {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module) -> None:
        module.__path__ = []
        module.__bakery_stub__ = True


def _record_torchvision_unavailable() -> None:
    try:
        from transformers.utils import import_utils
    except Exception:  # no transformers: nothing to record
        return
    for name in ("is_torchvision_available", "is_torchvision_v2_available"):
        fn = getattr(import_utils, name, None)
        if fn is not None:
            fn()  # lru-cached: False from now on, the stub notwithstanding


def install() -> None:
    """Put the stub finder first on ``sys.meta_path`` (once)."""
    if any(type(f).__name__ == "_StubFinder" for f in sys.meta_path):
        return
    _record_torchvision_unavailable()
    sys.meta_path.insert(0, _StubFinder())


install()
