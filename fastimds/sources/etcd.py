"""Fleet mode: this host's VMs from etcd, followed by watch, served through every outage.

Rules of this module:
- The host's VMs are the keys under `{prefix}/hosts/{host}/vms/`
  (fastimds.sources.etcd_layout). A sync reads them all at one revision R
  (paged, every page at R) and makes the etcd VMs match: VMs deleted from
  etcd are removed first (freeing their addresses), then changed ones put.
  The watch then runs from R+1 and applies each event in revision order.
- Every value is validated as an admin write is (fastimds.control.writer):
  a refused one is logged with its key and every problem, counted, and the
  VM keeps its last good description. One refused for an address another
  etcd VM still claims is retried after each later batch, so an address
  that moves between VMs over two revisions lands once both are applied.
- Availability first. Nothing here ever stops what is served: etcd away at
  start serves the saved VMs (--state-dir) and retries; etcd lost while
  running keeps serving and reconnects, resuming the watch at the revision
  after the last one applied; a compacted revision forces a fresh sync.
  Each retry waits a capped, jittered, doubling delay (fastimds.config) on
  a new channel: gRPC's own reconnect backoff on an old one grows to
  minutes, far past the 5 s convergence target.
- A quiet watch cannot tell a quiet store from a lost one, so a contact read
  (quorum, linearizable) runs every ETCD_CONTACT_INTERVAL_S beside it; its
  failure ends the session and starts the reconnect.
- What was applied last is marked in the state dir (bus ETCD_MARK_FILE), so
  a restart with etcd away knows its saved VMs are a synced view (ready) and
  reports the revision they came from.
- All of it runs on the control's event loop; the writer is called between
  awaits, never from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import orjson

from fastimds.bus.atomic import write_whole
from fastimds.bus.layout import ETCD_MARK_FILE
from fastimds.config import (
    ETCD_CONTACT_INTERVAL_S,
    ETCD_REQUEST_TIMEOUT_S,
    ETCD_RETRY_CAP_S,
    ETCD_RETRY_FIRST_S,
    EtcdSettings,
)
from fastimds.control.writer import ETCD_SOURCE_PREFIX, Control, UpdateError
from fastimds.imds.datafile import MAX_VM_FILE_BYTES, DataError, describe_vm
from fastimds.imds.registry import ConflictError
from fastimds.ops.event_log import EventLog
from fastimds.sources.base import SourceStatus
from fastimds.sources.etcd_client import EtcdConnection, EtcdSetupError, connect, describe_error
from fastimds.sources.etcd_layout import FleetLayout, prefix_end

# Keys per page of a sync. A page must fit gRPC's 4 MiB default message: a
# description is a few KiB (the sample is 4 KiB), and a page that does not fit
# is read again at half the size (EtcdConnection.pages).
SYNC_PAGE_KEYS = 64
PUT, DELETE = 0, 1  # etcd's event types (mvccpb.Event.EventType)


class Backoff:
    """Capped doubling delays, each drawn between half and all of its step (jitter)."""

    def __init__(self, first_s: float = ETCD_RETRY_FIRST_S, cap_s: float = ETCD_RETRY_CAP_S) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.step_s = first_s

    def next(self) -> float:
        step = self.step_s
        self.step_s = min(self.cap_s, step * 2)
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        self.step_s = self.first_s


class ResyncNeeded(Exception):
    """The watch cannot go on from the revision applied: read the whole prefix again."""


class EtcdSource:
    def __init__(self, settings: EtcdSettings, control: Control, log: EventLog) -> None:
        self.settings = settings
        self.control = control
        self.log = log
        self.layout = FleetLayout(settings.prefix)
        self.host = settings.host_id
        self.prefix = self.layout.host_prefix(self.host)
        self.revision: int | None = None  # applied last; None until a sync this run
        self.saved_revision: int | None = None  # what the state dir's VMs were synced at, if it says
        self.connected = False
        self.last_contact: float | None = None
        self.resyncs = 0
        self.error: str | None = None
        self.needs_sync = True
        self.conflicted: dict[bytes, bytes] = {}  # key -> value refused for an address another VM holds
        self.marked: int | None = None  # the revision the mark file holds
        self.backoff = Backoff()
        self.task: asyncio.Task[None] | None = None
        self.first_outcome = asyncio.Event()  # set after the first sync or the first failure
        self.sync_requested = asyncio.Event()  # SIGHUP: a full sync now

    # ---- the Source interface ----

    def load(self) -> None:
        """Nothing is read from etcd here: the saved VMs are already loaded; read the mark beside them."""
        try:
            mark = orjson.loads((self.control.bus.directory / ETCD_MARK_FILE).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return
        if isinstance(mark, dict) and mark.get("host") == self.host and mark.get("prefix") == self.settings.prefix:
            revision = mark.get("revision")
            self.saved_revision = self.marked = revision if isinstance(revision, int) else None

    async def start(self) -> None:
        """Follow etcd; returns after the first sync or the first failure (bounded), so a reachable
        store's VMs are served when the server says it is ready."""
        self.task = asyncio.ensure_future(self._follow())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first_outcome.wait(), ETCD_REQUEST_TIMEOUT_S * 2)

    def reload(self) -> None:
        self.needs_sync = True
        self.sync_requested.set()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def status(self) -> SourceStatus:
        where = f"{','.join(self.settings.endpoints)} {self.prefix.decode()}"
        return SourceStatus(
            "etcd",
            where,
            connected=self.connected,
            revision=self.revision if self.revision is not None else self.saved_revision,
            last_contact=self.last_contact,
            synced=self.revision is not None or self.saved_revision is not None,
            resyncs=self.resyncs,
            error=None if self.connected else self.error,
        )

    # ---- following ----

    async def _follow(self) -> None:
        """Connect, sync when needed, follow; after any failure wait (backoff) and start again, for ever."""
        while True:
            try:
                await self._connected_session()
            except ResyncNeeded as exc:
                self.resyncs += 1
                self.needs_sync = True
                self.log.event("etcd_resync", reason=str(exc), revision=self.revision)
            except EtcdSetupError as exc:  # no retry helps: say so, and serve what is saved
                self._lost(str(exc), retry_in_s=None)
                return
            except Exception as exc:
                delay = self.backoff.next()
                self._lost(describe_error(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
            # A session that ended without an error was asked for a sync (SIGHUP): at once.

    async def _connected_session(self) -> None:
        connection = await asyncio.wait_for(connect(self.settings), ETCD_REQUEST_TIMEOUT_S)
        try:
            if self.needs_sync or self.revision is None:
                await self._sync(connection)
            await self._session(connection)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), ETCD_REQUEST_TIMEOUT_S)

    def _lost(self, error: str, retry_in_s: float | None) -> None:
        was_connected = self.connected
        self.connected = False
        self.error = error
        self.first_outcome.set()
        self.log.event(
            "etcd_unreachable" if retry_in_s is not None else "etcd_unusable",
            error=error,
            was_connected=was_connected,
            retry_in_s=round(retry_in_s, 3) if retry_in_s is not None else None,
            revision=self.revision,
        )

    def _contact(self, store_revision: int) -> None:
        if not self.connected:
            self.log.event("etcd_connected", revision=self.revision, store_revision=store_revision)
        self.connected = True
        self.error = None
        self.last_contact = time.time()
        self.backoff.reset()

    async def _session(self, connection: EtcdConnection) -> None:
        """Watch and keep contact on one channel until one fails (raises) or a sync is asked for (returns)."""
        self.sync_requested.clear()
        tasks = [
            asyncio.ensure_future(self._watch(connection)),
            asyncio.ensure_future(self._keep_contact(connection)),
            asyncio.ensure_future(self.sync_requested.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
        if self.sync_requested.is_set():
            self.needs_sync = True

    async def _keep_contact(self, connection: EtcdConnection) -> None:
        while True:
            reply = await connection.kv.get(self.prefix, count_only=True, timeout=ETCD_REQUEST_TIMEOUT_S)
            self._contact(reply.header.revision)
            self._mark()
            await asyncio.sleep(ETCD_CONTACT_INTERVAL_S)

    async def _sync(self, connection: EtcdConnection) -> None:
        """Read every key of the host at one revision, then make the etcd VMs match it."""
        values: dict[bytes, bytes] = {}
        revision = 0
        try:
            async for page_revision, kvs in connection.pages(self.prefix, page_keys=SYNC_PAGE_KEYS):
                revision = page_revision  # every page's: the revision the whole read is at
                values.update((bytes(kv.key), bytes(kv.value)) for kv in kvs)
        except Exception as exc:
            if "compacted" in describe_error(exc):
                raise ResyncNeeded(f"revision {revision} compacted during the sync") from None
            raise
        self._contact(revision)
        self._apply_sync(values)
        self.revision = revision
        self.needs_sync = False
        self.first_outcome.set()
        self.log.event("etcd_synced", revision=revision, vms=len(values), host=self.host)
        self._mark()

    def _apply_sync(self, values: dict[bytes, bytes]) -> None:
        control = self.control
        wanted = {ETCD_SOURCE_PREFIX + key.decode("utf-8", "replace") for key in values}
        for vm_id in control.live_ids():
            source = control.source_of(vm_id) or ""
            if source.startswith(ETCD_SOURCE_PREFIX) and source not in wanted:
                control.delete(vm_id, source)  # deleted (or moved away) while we were not watching
        self.conflicted.clear()
        for key, value in values.items():
            self._put(key, value)
        self._retry_conflicted()

    async def _watch(self, connection: EtcdConnection) -> None:
        assert self.revision is not None
        async for reply in connection.watch(self.prefix, prefix_end(self.prefix), self.revision + 1):
            if reply.compact_revision > 0:
                raise ResyncNeeded(f"revision {self.revision + 1} compacted (oldest kept {reply.compact_revision})")
            if reply.canceled:  # etcd ends a watch it cannot serve; a fresh sync is always safe
                raise ResyncNeeded(f"watch canceled by etcd: {reply.cancel_reason or 'no reason given'}")
            if reply.events:
                self._apply_events(reply.events)
            self._contact(reply.header.revision)

    def _apply_events(self, events: Any) -> None:
        for event in events:
            key, revision = bytes(event.kv.key), int(event.kv.mod_revision)
            if self.revision is not None and revision <= self.revision:
                continue  # seen already (a watch resumed across a page of events)
            self.conflicted.pop(key, None)
            if event.type == DELETE:
                self._delete(key)
            else:
                self._put(key, bytes(event.kv.value))
            self.revision = revision
        self._retry_conflicted()

    # ---- applying ----

    def _put(self, key: bytes, value: bytes) -> bool:
        """One key's value into the writer; False when refused (logged and counted)."""
        source = ETCD_SOURCE_PREFIX + key.decode("utf-8", "replace")
        vm_id = self.layout.vm_of(self.host, key)
        problems: list[str] = []
        document: Any = None
        if vm_id is None:
            problems = [f"not a VM key: expected {self.prefix.decode()}<vm id>"]
        elif len(value) > MAX_VM_FILE_BYTES:
            problems = [f"$: {len(value)} bytes; a VM description is limited to {MAX_VM_FILE_BYTES}"]
        else:
            try:
                document = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                problems = [f"$: not JSON: {exc}"]
        if vm_id is None or problems:
            self._refused(source, vm_id, "invalid VM description", problems)
            self.control.updates["refused", "etcd"] += 1
            return False
        try:
            if isinstance(document, dict):
                self.control.put_if_changed(vm_id, document, source)
            else:
                self.control.put(vm_id, document, source)  # refused: a description is an object
        except UpdateError as exc:
            if exc.status == 409 and "claimed by both" in exc.message:
                self.conflicted[key] = value
            self._refused(source, vm_id, exc.message, exc.problems)
            return False
        return True

    def _delete(self, key: bytes) -> None:
        source = ETCD_SOURCE_PREFIX + key.decode("utf-8", "replace")
        vm_id = self.layout.vm_of(self.host, key)
        if vm_id is not None and self.control.source_of(vm_id) == source:
            self.control.delete(vm_id, source)

    def _retry_conflicted(self) -> None:
        """Values refused for an address conflict, tried again while one more lands each round.

        One whose address is still taken is skipped without a write, a log line or a count: its
        refusal was logged and counted once, when it arrived.
        """
        landed = True
        while self.conflicted and landed:
            landed = False
            for key, value in list(self.conflicted.items()):
                vm_id = self.layout.vm_of(self.host, key)
                try:
                    assert vm_id is not None  # only VM keys are ever conflicted
                    self.control.model.check(vm_id, describe_vm(orjson.loads(value), "etcd"))
                except (ConflictError, DataError):
                    continue
                del self.conflicted[key]
                landed = self._put(key, value) or landed

    def _refused(self, source: str, vm_id: str | None, error: str, problems: list[str]) -> None:
        self.log.event("update_refused", source=source, vm=vm_id, error=error, problems=problems)

    def _mark(self) -> None:
        """Note the revision applied in the state dir (at most once per change)."""
        if self.revision is None or self.revision == self.marked:
            return
        mark = {"host": self.host, "prefix": self.settings.prefix, "revision": self.revision, "at": time.time()}
        bus = self.control.bus
        try:
            write_whole(bus.directory / ETCD_MARK_FILE, orjson.dumps(mark), durable=bus.durable)
        except OSError as exc:
            self.log.event("etcd_mark_failed", error=str(exc))
            return
        self.marked = self.revision
