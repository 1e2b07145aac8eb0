"""The signing budget: how many fresh RSA signatures one VM may cost a worker per second.

Rules of this module:
- A fresh signature is a token the issuer has not cached (fastimds.imds.identity)
  or an attested document whose signed content is not cached
  (fastimds.imds.attested): ~0.4 ms of a core each (RSA 2048, measured on
  the two-core test machine, reliability.md "High: one tenant stalling
  others"). Everything else a VM asks costs tens of microseconds, so the
  signatures are what one VM can spend a worker's time on: 2 MB of
  pipelined distinct-resource token requests held every other VM on the
  worker for 5.8 s before this budget.
- Each VM has a token bucket per worker: `per_second` signatures a second,
  and up to one second's worth at once (the burst). A request that would
  sign past it gets its family's 429 with `Retry-After: 1` (`ERRORS
  ["signing_budget"]` of fastimds.imds.identity or of fastimds.imds.render:
  the same bytes as the throttle's 429 in that family), and nothing is
  signed; a cached token or document is answered as usual and costs
  nothing here.
- The budget holds whether or not throttling (fastimds.http.throttle) is on:
  throttling emulates Azure's request rates, this protects the worker.
  With N workers a VM can get N times the budget (no state is shared
  between workers on the request path), as with throttling.
- Pure: the time is an argument (the one the signature carries), nothing
  here reads a clock or does I/O. One `SigningBudgets` per worker, built
  with its ServerState (`signing`); the answer path hands the caller's
  VM's `SigningBudget` to `routing.resolve`, as it hands `keys`.
- The table is bounded: past MAX_BUDGETED_VMS it starts over (every VM a
  full bucket), so junk cannot grow it; VM ids come from the registry.
"""

from __future__ import annotations

# VMs tracked per worker before the table starts over; a worker serves far fewer.
MAX_BUDGETED_VMS = 100_000


class SigningBudget:
    """One VM's bucket: fresh signatures left, and when it was last filled."""

    __slots__ = ("per_second", "burst", "left", "filled_at")

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.burst = max(1.0, per_second)  # one second's worth at once
        self.left = self.burst
        self.filled_at = 0.0  # full already: the first take refills nothing it lacks

    def take(self, now: float) -> bool:
        """Spend one signature at `now` (epoch seconds); False when the VM has none left."""
        elapsed = now - self.filled_at
        if elapsed > 0:  # a clock stepped back refills nothing
            self.left = min(self.burst, self.left + elapsed * self.per_second)
            self.filled_at = now
        if self.left < 1.0:
            return False
        self.left -= 1.0
        return True


class SigningBudgets:
    """A worker's signing budgets, one per VM id, made on first use."""

    __slots__ = ("per_second", "vms")

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.vms: dict[str, SigningBudget] = {}

    def for_vm(self, vm_id: str) -> SigningBudget:
        """`vm_id`'s budget (a full one the first time)."""
        budget = self.vms.get(vm_id)
        if budget is None:
            if len(self.vms) >= MAX_BUDGETED_VMS:
                self.vms.clear()
            budget = self.vms[vm_id] = SigningBudget(self.per_second)
        return budget
