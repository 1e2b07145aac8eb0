"""Per-caller throttling, Azure's way: off by default, `--throttle azure` to emulate it.

Rules of this module:
- Azure's documented limits (spec §3.6): 5 requests a second per VM for the
  instance family (everything but identity), 20 a second for managed
  identity. Both are configurable (`--throttle-rps`, `--throttle-identity-rps`).
- A window is the wall-clock second of the worker's last tick: a caller may send the
  limit's worth of requests within it; the next one gets a pre-rendered 429
  with `Retry-After: 1`, decided before any routing, so a throttled request
  costs less than a served one. No clock is read per request.
- Windows are per caller address and per worker: with SO_REUSEPORT a
  caller's connections may land on several workers, so with N workers a
  caller can get up to N times the limit. A caller's window is looked up once
  per connection. At most MAX_CALLERS are tracked; past that the table is
  cleared (everyone starts a fresh window), so junk addresses cannot grow it.
- Azure's 5-concurrent limit on identity requests has no meaning here:
  every request is answered as soon as it is parsed, so none is ever pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Azure's documented per-VM limits, requests per second.
AZURE_INSTANCE_RPS: Final = 5
AZURE_IDENTITY_RPS: Final = 20
# Callers tracked per worker before the table starts over.
MAX_CALLERS: Final = 100_000


@dataclass(frozen=True)
class ThrottleLimits:
    instance_rps: int = AZURE_INSTANCE_RPS
    identity_rps: int = AZURE_IDENTITY_RPS


class CallerWindow:
    """One caller's requests in the current second, per family."""

    __slots__ = ("limits", "second", "instance", "identity")

    def __init__(self, limits: ThrottleLimits) -> None:
        self.limits = limits
        self.second = -1
        self.instance = 0
        self.identity = 0

    def allow(self, identity: bool, second: int) -> bool:
        if second != self.second:
            self.second, self.instance, self.identity = second, 0, 0
        if identity:
            self.identity += 1
            return self.identity <= self.limits.identity_rps
        self.instance += 1
        return self.instance <= self.limits.instance_rps


class Throttle:
    def __init__(self, limits: ThrottleLimits) -> None:
        self.limits = limits
        self.callers: dict[str, CallerWindow] = {}

    def for_caller(self, address: str) -> CallerWindow:
        window = self.callers.get(address)
        if window is None:
            if len(self.callers) >= MAX_CALLERS:
                self.callers.clear()
            window = self.callers[address] = CallerWindow(self.limits)
        return window
