"""Where VM descriptions come from: one small interface every source implements.

Rules of this module:
- A source turns what it reads into updates through the writer
  (fastimds.control.writer.Control): put, delete, nothing else. It never
  touches the bus or anything served.
- Its lifecycle: `load()` once before serving (a source that cannot load
  refuses the start: DataError or UpdateError); `start()` once on the
  control's event loop, returning once it follows changes (a directory
  watch; a watch on a store's revision); `reload()` on SIGHUP; `stop()` at
  shutdown. A source with nothing to follow starts and stops at once.
- `status()` is what readiness, /metrics and `fastimds admin status` report
  of it: whether it is connected (a file or a directory always is), whether
  what it serves is a whole view of its store (`synced`: loaded this run or
  saved by a run that had loaded it), the revision it has applied when its
  store numbers them, when it last heard from its store, how often it had to
  resync, and the last error. A source that is not synced makes the server
  not ready; a synced one that lost its store keeps it ready (availability
  first: it serves its last good data).
- The admin API is no source: its writes are the admin API calling Control.
"""

from __future__ import annotations

from typing import Protocol

from fastimds.ops.source_status import SourceStatus

__all__ = ["Source", "SourceStatus"]


class Source(Protocol):
    def load(self) -> None: ...

    async def start(self) -> None: ...

    def reload(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> SourceStatus: ...
