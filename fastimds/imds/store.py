"""SnapshotStore: which snapshot of one VM is being served now.

Rules of this module:
- Publishing is one reference rebind (`self.current = snapshot`), atomic in
  CPython: a reader takes `store.current` once per request and sees either
  the old snapshot or the new one, never a mix.
- A snapshot is built completely before the rebind; a failed build raises
  and the old snapshot keeps serving.
- Generations only grow. `current` is None while the VM has no data (never
  published, or removed); connections that hold the store then get 404s and
  see the VM again if it is published anew.
"""

from __future__ import annotations

import time
from typing import Protocol

from fastimds.imds.datafile import VmDescription
from fastimds.imds.snapshot import Snapshot, build_snapshot

# The id the single-VM mode (`--data FILE`) gives its VM.
DEFAULT_VM_ID = "default"


class SnapshotStore:
    __slots__ = ("vm_id", "current", "generation", "watchers", "changed_at")

    def __init__(self, vm: VmDescription | None = None, vm_id: str = DEFAULT_VM_ID) -> None:
        self.vm_id = vm_id
        self.current: Snapshot | None = None
        self.generation = 0  # the last generation published, kept across removal
        # Held long-poll connections of this VM; each gets on_publish() after a change.
        self.watchers: set[Watcher] = set()
        self.changed_at = 0.0  # wall-clock time of the last publish or removal (telemetry: snapshot age)
        if vm is not None:
            self.publish(vm)

    def publish(self, vm: VmDescription, generation: int | None = None) -> Snapshot:
        """Build a snapshot of `vm` off to the side, then swap it in.

        `generation` comes from the writer that numbered the update (the admin
        API); it must be newer than what is served. None takes the next one.
        """
        if generation is None:
            generation = self.generation + 1
        elif generation <= self.generation:
            raise ValueError(f"VM {self.vm_id!r}: generation {generation} is not newer than {self.generation}")
        snapshot = build_snapshot(vm, generation)
        self.current = snapshot
        self.generation = generation
        self.changed_at = time.time()
        self._notify()
        return snapshot

    def clear(self, generation: int | None = None) -> None:
        """The VM was removed (as `generation`): its callers get 404s until it is published again."""
        self.current = None
        self.changed_at = time.time()
        if generation is not None:
            self.generation = max(self.generation, generation)
        self._notify()

    def _notify(self) -> None:
        for watcher in list(self.watchers):
            watcher.on_publish()


class Watcher(Protocol):
    def on_publish(self) -> None: ...
