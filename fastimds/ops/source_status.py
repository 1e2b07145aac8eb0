"""Where a source of VM data stands: the record readiness, /metrics and `fastimds admin status` show.

Rules of this module:
- Sources (fastimds.sources) make it; whoever reports reads it. It lives
  below both, so /metrics (fastimds.ops.telemetry) needs no source.
- A plain value, made fresh on every ask: nothing here is kept or counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceStatus:
    kind: str  # "data-file", "data-dir", ...
    where: str  # the file, folder or endpoint it reads
    connected: bool = True  # False: it cannot reach its store now (serving what it last had)
    revision: int | None = None  # the store's revision applied last, when the store numbers them
    last_contact: float | None = None  # wall-clock time it last heard from its store, when it has one
    synced: bool = True  # False: it has no whole view of its store to serve yet
    resyncs: int = 0  # full re-reads after its store forgot the history it needed (etcd compaction)
    error: str | None = None  # why it is not connected, when it is not

    def describe(self, now: float) -> dict[str, object]:
        """The JSON /readyz and `fastimds admin status` show."""
        shown: dict[str, object] = {"kind": self.kind, "where": self.where, "connected": self.connected}
        shown["synced"] = self.synced
        if self.revision is not None:
            shown["revision"] = self.revision
        if self.last_contact is not None:
            shown["seconds_since_contact"] = round(max(0.0, now - self.last_contact), 3)
        shown["resyncs"] = self.resyncs
        if self.error is not None:
            shown["error"] = self.error
        return shown
