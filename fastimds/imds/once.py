"""A value made once per process: set before fork to share it, or made on first use.

Rules of this module:
- `set()` is called by serve() before any fork when every process must hold
  the same value (a signing key); otherwise the first `get()` makes it.
- Single-threaded use only (an event loop), so there is no lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Once(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._value: T | None = None

    def set(self, value: T) -> None:
        self._value = value

    def get(self) -> T:
        if self._value is None:
            self._value = self._make()
        return self._value
