"""The fuzz suites' example budget: fixed and derandomised in CI, random and large in the long run.

Rules of this module:
- `make test` runs each property with its own small CI budget, derandomised,
  so CI is repeatable and quick; `FUZZ_EXAMPLES=N` (`make fuzz-long`) gives
  every property N random examples, capped where a property is slow.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

LONG_RUN_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def budget(ci_examples: int, long_run_cap: int | None = None) -> Callable[[Any], Any]:
    """CI: `ci_examples`, derandomised. FUZZ_EXAMPLES=N: N random examples (at most `long_run_cap`)."""
    long_run = min(LONG_RUN_EXAMPLES, long_run_cap or LONG_RUN_EXAMPLES)
    return settings(
        max_examples=long_run or ci_examples,
        derandomize=not LONG_RUN_EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
