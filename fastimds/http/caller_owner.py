"""Which VM a connection answers as, when its caller address changes owner (issue 16).

Rules of this module:
- A connection's VM (`vm`, a stable SnapshotStore) is looked up when it
  opens (`connection_made`, fastimds.http.connection) and again only when the
  registry reports that its caller address changed owner: a VM claimed it,
  dropped it, or was removed (VmRegistry.publish and .remove, through
  ServerState.owners_changed, between requests). Nothing is checked per
  request: the hot path keeps reading `self.vm`.
- Re-mapped, not closed: the connection holds nothing of its VM but `vm`
  and the request log's head (the throttle window is per caller address,
  the request memo per snapshot), so the client keeps its connection and
  never races a close against a request it is sending.
- A long-poll held on the old VM waited for a change of the old VM's view:
  it is answered at once with the new owner's current value (a new view,
  with that owner's ETag, as a timeout would answer it), never left parked
  on the old VM and never answered later with the old VM's data.
"""

from __future__ import annotations

from fastimds.http.answer import AnswerPath
from fastimds.http.phases import CLOSED, LONG_POLL


class CallerOwner(AnswerPath):
    """HttpProtocol's re-mapping (a part in its one chain, fastimds.http.fields)."""

    __slots__ = ()

    def remap(self) -> None:
        """The caller's address changed owner: answer as its new owner from the next request on."""
        store = self.state.registry.store_for(self.peer or None)
        if store is self.vm or self.phase is CLOSED:
            return
        self.vm.watchers.discard(self)
        self.vm = store
        self.log_head = ("", "", 0)  # generation 0 is never served: the next log record names the new VM
        if self.hold is LONG_POLL:
            self._release_with_current()
