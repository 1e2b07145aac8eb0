"""SnapshotStore: which snapshot is being served now.

Rules of this module:
- Publishing is one reference rebind (`self.current = snapshot`), atomic in
  CPython: a reader takes `store.current` once per request and sees either
  the old snapshot or the new one, never a mix.
- A snapshot is built completely before `publish` sees it; a failed build
  never reaches this module, so the old snapshot keeps serving.
- Generations only grow.
"""

from __future__ import annotations

from fastimds.datafile import VmDescription
from fastimds.snapshot import Snapshot, build_snapshot


class SnapshotStore:
    __slots__ = ("current",)

    def __init__(self, vm: VmDescription) -> None:
        self.current: Snapshot = build_snapshot(vm, generation=1)

    def publish(self, vm: VmDescription) -> Snapshot:
        """Build a snapshot of `vm` off to the side, then swap it in."""
        snapshot = build_snapshot(vm, generation=self.current.generation + 1)
        self.current = snapshot
        return snapshot
