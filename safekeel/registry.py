"""A named registry of factories (judges, selectors, ...): a new implementation is one decorated class."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[[], T]] = {}

    def register(self, name: str) -> Callable[[Callable[[], T]], Callable[[], T]]:
        def decorator(factory: Callable[[], T]) -> Callable[[], T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> T:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()}")
        return self._factories[name]()

    def factory(self, name: str) -> Callable[..., T]:
        """The registered factory itself (for implementations that take constructor arguments)."""
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {self.names()}")
        return self._factories[name]
