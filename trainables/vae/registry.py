"""Name -> class registries: a new prior, likelihood or model is one decorated class."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type]) -> Callable[[str], Callable[[T], T]]:
    """`register = registrar(TABLE)`; then `@register("name")` adds a class and sets `cls.name`."""

    def register(name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in table and table[name] is not cls:
                raise ValueError(f"{name!r} is already registered to {table[name].__qualname__}")
            table[name] = cls
            cls.name = name
            return cls

        return add

    return register
