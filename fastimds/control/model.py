"""The control plane's own model: every VM's description, generation and caller addresses.

Rules of this module:
- This is the writer's truth. The control plane never reads it back from what
  is served (snapshots, registries): it has no serving registry at all.
- Generations only grow, removals included: a removed VM keeps its record
  (vm None) so its next version is numbered above every one anyone has seen.
- No address belongs to two VMs (fastimds.imds.registry.caller_addresses
  says which addresses a VM claims): `check` refuses what would make it so,
  naming both VMs, and `set` changes nothing when it refuses.
- Pure bookkeeping: no I/O, no clock but the `now` it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastimds.imds.datafile import VmDescription
from fastimds.imds.registry import ConflictError, caller_addresses


@dataclass(frozen=True)
class VmRecord:
    generation: int
    vm: VmDescription | None  # None: removed (a tombstone), or its saved file was unusable
    changed_at: float  # wall-clock time of the change (telemetry: how old the served data is)


class VmModel:
    def __init__(self, default_vm_id: str | None = None) -> None:
        self.default_vm_id = default_vm_id
        self.records: dict[str, VmRecord] = {}
        self.owners: dict[str, str] = {}  # caller address -> the VM that claims it
        self.addresses: dict[str, frozenset[str]] = {}  # VM id -> the addresses it claims

    def vm(self, vm_id: str) -> VmDescription | None:
        record = self.records.get(vm_id)
        return record.vm if record is not None else None

    def generation(self, vm_id: str) -> int:
        record = self.records.get(vm_id)
        return record.generation if record is not None else 0

    def live(self) -> dict[str, VmDescription]:
        """Every VM that has data now, by id in order."""
        return {vm_id: record.vm for vm_id, record in sorted(self.records.items()) if record.vm is not None}

    def check(self, vm_id: str, vm: VmDescription, replacing: frozenset[str] = frozenset()) -> frozenset[str]:
        """The VM's caller addresses, or ConflictError naming both VMs.

        VMs in `replacing` are about to be removed, so their addresses are free.
        """
        addresses = caller_addresses(vm)
        for address in sorted(addresses):
            owner = self.owners.get(address)
            if owner is not None and owner != vm_id and owner not in replacing:
                raise ConflictError(f"address {address} is claimed by both VM {owner!r} and VM {vm_id!r}")
        return addresses

    def set(self, vm_id: str, vm: VmDescription, generation: int, now: float) -> None:
        """`vm` is `vm_id` as `generation`; ConflictError (changing nothing) if it claims a taken address."""
        addresses = self.check(vm_id, vm)
        self._release(vm_id)
        for address in addresses:
            self.owners[address] = vm_id
        self.addresses[vm_id] = addresses
        self.records[vm_id] = VmRecord(max(generation, self.generation(vm_id)), vm, now)

    def remove(self, vm_id: str, generation: int, now: float) -> bool:
        """`vm_id` is removed as `generation`; False if it had no data."""
        had_data = self.vm(vm_id) is not None
        self._release(vm_id)
        self.records[vm_id] = VmRecord(max(generation, self.generation(vm_id)), None, now)
        return had_data

    def _release(self, vm_id: str) -> None:
        for address in self.addresses.pop(vm_id, frozenset()):
            del self.owners[address]

    def summary(self) -> list[dict[str, Any]]:
        return [
            {"id": vm_id, "generation": self.generation(vm_id), "callers": sorted(self.addresses.get(vm_id, ()))}
            for vm_id in self.live()
        ]
