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
- `status()` is what readiness reports of it: whether it is connected (a
  file or a directory always is), the revision it has applied when its
  store numbers them, and when it last heard from its store.
- The admin API is no source: its writes are the admin API calling Control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SourceStatus:
    kind: str  # "data-file", "data-dir", ...
    where: str  # the file, folder or endpoint it reads
    connected: bool = True  # False: it cannot reach its store now (serving what it last had)
    revision: int | None = None  # the store's revision applied last, when the store numbers them
    last_contact: float | None = None  # wall-clock time it last heard from its store, when it has one


class Source(Protocol):
    def load(self) -> None: ...

    async def start(self) -> None: ...

    def reload(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> SourceStatus: ...
