"""Watching a directory: batches of changed names, and a rescan when nothing happens.

Rules of this module:
- `start_watch` returns only once the watch is known to run, then rescans:
  a write before the watch runs is caught by that rescan, one after it by
  the watch, so none is missed.
- With no change for WATCH_IDLE_RESCAN_MS the caller's `on_idle` runs: a
  safety net for any event the OS dropped.
- A callback that raises is logged; the watch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastimds.bus.layout import PROBE_PREFIX, TEMP_PREFIX
from fastimds.ops.event_log import EventLog

# Changes seen by the watcher are delivered this soon after the last one
# (watchfiles' `step`); the update-latency target is 100 ms at p99.
WATCH_STEP_MS = 5
WATCH_DEBOUNCE_MS = 50
# With no change for this long the watch yields an empty batch: the caller
# rescans then, which closes the window between its first load and the
# watcher starting, and is a safety net for any event the OS dropped.
WATCH_IDLE_RESCAN_MS = 1000
# A watch is expected to start within this; past it we serve anyway and rely
# on the once-a-second rescan.
WATCH_START_TIMEOUT_S = 5.0


async def watch_directory(directory: Path) -> AsyncIterator[tuple[set[str], bool]]:
    """(names that changed, whether a probe file was seen), batch by batch.

    Names starting with TEMP_PREFIX (temp and probe files) are not reported.
    An empty batch means "nothing for a while": time to rescan.
    Probe files (PROBE_PREFIX) let a caller learn that the watch is running.
    """
    from watchfiles import awatch

    watch = awatch(
        directory,
        debounce=WATCH_DEBOUNCE_MS,
        step=WATCH_STEP_MS,
        recursive=False,
        rust_timeout=WATCH_IDLE_RESCAN_MS,
        yield_on_timeout=True,
    )
    async for batch in watch:
        names = set()
        probed = False
        for _change, raw_path in batch:
            name = Path(raw_path).name
            probed = probed or name.startswith(PROBE_PREFIX)
            if not name.startswith(TEMP_PREFIX):
                names.add(name)
        if names or probed or not batch:
            yield names, probed


async def until_watching(directory: Path, active: asyncio.Event, timeout_s: float, log: EventLog) -> bool:
    """Touch a probe file in `directory` until the watch reading it sets `active`."""
    loop = asyncio.get_running_loop()
    probe = directory / f"{PROBE_PREFIX}{os.getpid()}"
    give_up_at = loop.time() + timeout_s
    try:
        while not active.is_set() and loop.time() < give_up_at:
            probe.write_bytes(b"")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(active.wait(), 0.02)
    finally:
        probe.unlink(missing_ok=True)
    if not active.is_set():
        log.event("watch_start_slow", directory=str(directory))
    return active.is_set()


async def start_watch(
    directory: Path, on_change: Callable[[set[str]], None], on_idle: Callable[[], None], log: EventLog
) -> asyncio.Task[None]:
    """Watch `directory`; once the watch is known to run, rescan (`on_idle`) and return its task."""
    active = asyncio.Event()

    async def follow() -> None:
        async for names, probed in watch_directory(directory):
            if probed:
                active.set()
            try:
                if names:
                    on_change(names)
                elif not probed:
                    on_idle()  # idle: a safety net for anything the watch missed
            except Exception as exc:  # a bug in one callback must not end the watch for good
                log.event("watch_callback_failed", directory=str(directory), error=repr(exc))

    task = asyncio.ensure_future(follow())
    await until_watching(directory, active, WATCH_START_TIMEOUT_S, log)
    on_idle()
    return task
