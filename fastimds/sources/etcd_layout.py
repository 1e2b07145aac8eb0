"""The fleet's layout in etcd: which key holds which host's VM.

Rules of this module:
- `{prefix}/hosts/{host}/vms/{vm}` holds one VM description, the same JSON a
  --data-dir file holds. Nothing else under the prefix is read; a key under
  a host's prefix that does not fit the layout is refused by name.
- A VM id is unique across the fleet: it lives under one host at a time.
  A move (live migration) is one transaction that deletes the key under the
  old host and puts it under the new one (fastimds.cli.fleet).
- Pure: names in, names out. Keys are bytes on the wire and UTF-8 here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastimds.imds.datafile import VM_ID_PATTERN


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's prefix convention)."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else b"\x00"


@dataclass(frozen=True)
class FleetLayout:
    prefix: str  # "/fastimds"

    @property
    def hosts_prefix(self) -> bytes:
        return f"{self.prefix}/hosts/".encode()

    def host_prefix(self, host: str) -> bytes:
        """Every key of `host`'s VMs starts with this."""
        return f"{self.prefix}/hosts/{host}/vms/".encode()

    def vm_key(self, host: str, vm_id: str) -> bytes:
        return self.host_prefix(host) + vm_id.encode()

    def parse(self, key: bytes) -> tuple[str, str] | None:
        """(host, VM id) of a VM key; None for a key that is not one."""
        hosts = self.hosts_prefix
        if not key.startswith(hosts):
            return None
        host, sep, rest = key[len(hosts) :].decode("utf-8", "replace").partition("/vms/")
        if not sep or not host or "/" in host or not VM_ID_PATTERN.fullmatch(rest):
            return None
        return host, rest

    def vm_of(self, host: str, key: bytes) -> str | None:
        """The VM id of a key under `host`'s prefix; None when it is not a VM key."""
        parsed = self.parse(key)
        return parsed[1] if parsed is not None and parsed[0] == host else None
