"""Name tables shared by Python, YAML and the CLI: passes, backends, targets.

A `Registry` maps names to entries and fails on an unknown name with the valid names and a
did-you-mean. The tables are filled when `passes` and `backends` are imported (their `__init__`
imports every module, each of which registers itself); the driver imports both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from optim.errors import OptimError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise OptimError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise UnknownNameError(self.kind, repr(name), self._items)
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


PASSES: Registry = Registry("pass")
BACKENDS: Registry = Registry("backend")
