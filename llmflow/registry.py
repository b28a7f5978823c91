"""Registries keyed by ``kind``: how placements and engines are found from a config.

A driver or engine module registers its class with ``@REGISTRY.register("kind")`` when it is
imported, and its package imports all of its modules (``import_all``), so adding one is adding
a module: no list to extend, no ``isinstance`` chain to grow.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from llmflow.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes by ``kind``; ``what`` names the config field in errors (``placement``, ``engine``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._by_kind: dict[str, type[T]] = {}

    def register(self, kind: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if kind in self._by_kind and self._by_kind[kind] is not cls:
                raise ValueError(f"{self.what} kind {kind!r} is registered twice")
            self._by_kind[kind] = cls
            return cls

        return add

    def get(self, kind: str) -> type[T]:
        try:
            return self._by_kind[kind]
        except KeyError:
            known = ", ".join(sorted(self._by_kind))
            raise ConfigError(f"{self.what}.kind: unsupported {self.what} {kind!r} (known: {known})") from None

    def kinds(self) -> list[str]:
        return sorted(self._by_kind)


def import_all(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> None:
    """Import every module of ``package`` (so each registers itself), except ``skip``."""
    for module in pkgutil.iter_modules(path):
        if module.name not in skip:
            importlib.import_module(f"{package}.{module.name}")
