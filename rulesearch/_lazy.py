"""Names a package imports from its submodules on first use (PEP 562), so that importing the package stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, namespace: dict, modules: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose names in ``modules`` (name -> relative submodule) are
    imported when first read, then kept in the package's ``namespace``."""

    def __getattr__(name: str):
        if name in modules:
            value = getattr(importlib.import_module(f".{modules[name]}", package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(modules))

    return __getattr__, __dir__
