"""Modules imported on first use, for commands whose fast path must not pay for them."""

from __future__ import annotations

from typing import Any


class Lazy:
    """A module imported on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            import importlib

            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
