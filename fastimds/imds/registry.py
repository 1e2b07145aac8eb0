"""VmRegistry: many VMs on one host, and which one a caller is.

Rules of this module:
- A caller is identified by its source address alone, and a link-local
  IPv6 address (fe80::/10) by its address and zone: fe80::1 on two links
  is two callers. The zone is the interface index, as the socket gives it
  (`caller_key`): a VM's "callers" list names such a caller "fe80::1%2".
  Keying by index costs nothing per connection and needs no host lookup
  here (an interface name would need if_nametoindex). A VM claims every
  private IP address of its network interfaces (IPv4 and IPv6) and the
  addresses in its optional "callers" list. No address belongs to two VMs:
  a publish that would make it so is refused with both VM ids named, and
  nothing changes.
- The mapping is looked up once per connection (`store_for`); the store it
  returns is the VM's stable SnapshotStore, so the connection sees every
  later publish of that VM without looking the mapping up again.
- When an address changes owner (a VM claims it, drops it, or is removed),
  `publish` and `remove` tell every `OwnerWatcher` (a worker's connections,
  fastimds.http.worker_state) which addresses, after the maps are updated:
  open connections from them are re-mapped before their next request
  (issue 16). Nothing is checked per request for it.
- A caller no VM claims gets the default VM's store when one is configured
  (single-VM mode serves every caller), else the registry's `nobody`, whose snapshot is
  always None and whose requests get 404.
- Everything runs on one event loop thread: an update runs to completion
  between two requests, so in-place changes to the maps are atomic for
  readers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Set
from functools import lru_cache
from typing import Any, Protocol

from fastimds.imds.datafile import VmDescription
from fastimds.imds.snapshot import Snapshot
from fastimds.imds.store import DEFAULT_VM_ID, SnapshotStore


class ConflictError(Exception):
    """An update that would give one caller address to two VMs."""


# Spellings remembered by canonical_address: a host's callers are its VMs' addresses, a few
# hundred at most; past this the least recently seen is parsed again (never wrong, only slower).
CANONICAL_ADDRESSES_REMEMBERED = 4096


# Remembered, because every accepted connection asks (caller_key, then store_for): two
# ipaddress parses were half the Python time of a one-request connection (4.9 of 9.7 µs
# under cProfile; tuning.md, "Connection: close").
@lru_cache(maxsize=CANONICAL_ADDRESSES_REMEMBERED)
def canonical_address(address: str) -> str | None:
    """One spelling per address ("::ffff:10.0.0.4" is 10.0.0.4); None if not an IP.

    A link-local IPv6 address keeps its zone, an interface index ("fe80::1%2"):
    without it the address names no caller (None); a zone on any other
    address is dropped (a global address is the same on every link).
    """
    host, _, zone = address.partition("%")
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return parsed.ipv4_mapped.compressed
        if parsed.is_link_local:
            return f"{parsed.compressed}%{int(zone)}" if zone.isdigit() and zone.isascii() else None
    return parsed.compressed


def caller_key(peername: object) -> str:
    """The key a connection's caller is known by, from asyncio's peername (once per connection).

    IPv4 peers are (host, port); IPv6 ones (host, port, flowinfo, scope_id),
    and a link-local host means nothing without its scope_id: fe80::1 on
    interface 2 is "fe80::1%2", on interface 3 another caller. "" for a peer
    that is not an IP socket.
    """
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return ""
    host = peername[0].partition("%")[0]  # some platforms spell the zone in the host as well
    scope_id = peername[3] if len(peername) >= 4 and isinstance(peername[3], int) else 0
    key = canonical_address(f"{host}%{scope_id}" if scope_id else host) or host
    # The transport keeps its peername: reuse its string rather than hold an equal copy per connection
    # (tests/unit/http/test_change_notification.py counts a held connection's bytes).
    return host if key == host else key


def caller_addresses(vm: VmDescription) -> frozenset[str]:
    """Every address whose requests belong to `vm`."""
    found: set[str] = set()
    interfaces = vm.instance.get("network", {}).get("interface", [])
    for interface in interfaces if isinstance(interfaces, list) else []:
        for family in ("ipv4", "ipv6"):
            entries = interface.get(family, {}).get("ipAddress", []) if isinstance(interface, dict) else []
            for entry in entries if isinstance(entries, list) else []:
                address = canonical_address(entry.get("privateIpAddress", "")) if isinstance(entry, dict) else None
                if address:
                    found.add(address)
    for caller in vm.reserved.get("callers", []):
        address = canonical_address(caller)
        if address:
            found.add(address)
    return frozenset(found)


class OwnerWatcher(Protocol):
    """Told which caller addresses changed owner, once the registry's maps say so."""

    def owners_changed(self, addresses: Set[str]) -> None: ...


class VmRegistry:
    def __init__(self, default_vm_id: str | None = None) -> None:
        self.stores: dict[str, SnapshotStore] = {}
        self.callers: dict[str, SnapshotStore] = {}
        self.addresses: dict[str, frozenset[str]] = {}
        # Who holds connections keyed by caller address (a worker's ServerState registers itself).
        self.owner_watchers: list[OwnerWatcher] = []
        self.default_vm_id = default_vm_id
        # The store of callers no VM claims: never published, so its snapshot is always None (404s).
        self.nobody = SnapshotStore(vm_id="<no VM>")

    @classmethod
    def single(cls, vm: VmDescription) -> VmRegistry:
        """Single-VM mode: one VM that answers every caller."""
        registry = cls(default_vm_id=DEFAULT_VM_ID)
        registry.publish(DEFAULT_VM_ID, vm)
        return registry

    @property
    def default(self) -> SnapshotStore:
        if self.default_vm_id is None:
            return self.nobody
        return self._store(self.default_vm_id)

    def _store(self, vm_id: str) -> SnapshotStore:
        store = self.stores.get(vm_id)
        if store is None:
            store = self.stores[vm_id] = SnapshotStore(vm_id=vm_id)
        return store

    def store_for(self, address: str | None) -> SnapshotStore:
        """The store of the VM that `address` belongs to (once per connection; a `caller_key` is canonical)."""
        if not address:
            return self.default
        store = self.callers.get(address)
        if store is None:
            store = self.callers.get(canonical_address(address) or "")
        return store if store is not None else self.default

    def owner_of(self, address: str) -> str | None:
        store = self.callers.get(address)
        return store.vm_id if store is not None else None

    def check(self, vm_id: str, vm: VmDescription, replacing: frozenset[str] = frozenset()) -> frozenset[str]:
        """The VM's caller addresses, or ConflictError naming both VMs.

        VMs in `replacing` are about to be removed, so their addresses are free.
        """
        addresses = caller_addresses(vm)
        for address in sorted(addresses):
            owner = self.owner_of(address)
            if owner is not None and owner != vm_id and owner not in replacing:
                raise ConflictError(f"address {address} is claimed by both VM {owner!r} and VM {vm_id!r}")
        return addresses

    def publish(self, vm_id: str, vm: VmDescription, generation: int | None = None) -> Snapshot:
        """Build and publish `vm` as `vm_id`; raises (changing nothing) on conflict or bad build."""
        addresses = self.check(vm_id, vm)
        store = self._store(vm_id)
        snapshot = store.publish(vm, generation)
        before = self.addresses.get(vm_id, frozenset())
        for address in before - addresses:
            del self.callers[address]
        for address in addresses:
            self.callers[address] = store
        self.addresses[vm_id] = addresses
        self._owners_changed(before ^ addresses)  # dropped ones fall to the default; new ones had no owner
        return snapshot

    def remove(self, vm_id: str, generation: int | None = None) -> bool:
        """Remove a VM (as `generation`, when the writer numbered the removal); False if it had no data."""
        store = self._store(vm_id) if generation is not None else self.stores.get(vm_id)
        if store is None:
            return False
        had_data = store.current is not None
        store.clear(generation)
        dropped = self.addresses.pop(vm_id, frozenset())
        for address in dropped:
            del self.callers[address]
        self._owners_changed(dropped)
        return had_data

    def _owners_changed(self, addresses: Set[str]) -> None:
        if addresses:
            for watcher in self.owner_watchers:
                watcher.owners_changed(addresses)

    def live(self) -> dict[str, SnapshotStore]:
        """Every VM that has data now."""
        return {vm_id: store for vm_id, store in self.stores.items() if store.current is not None}

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"id": vm_id, "generation": store.generation, "callers": sorted(self.addresses.get(vm_id, ()))}
            for vm_id, store in sorted(self.live().items())
        ]
