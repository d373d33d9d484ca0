"""Lazy package exports: ``import sdstack.lora`` costs nothing until a name is used.

A package lists ``name -> submodule`` and gets the module-level ``__getattr__`` and
``__dir__`` that import the submodule on first use (PEP 562), so the prompt parser and
``--help`` never pay for torch or diffusers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports[name]`` is the submodule
    (relative to ``package``) that defines ``name``; a value found is cached in
    ``namespace`` (the package's ``globals()``)."""

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return getattr_, dir_
