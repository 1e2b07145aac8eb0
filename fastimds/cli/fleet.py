"""`fastimds fleet ...`: the operator's commands on the fleet's VMs in etcd.

Rules of this module:
- The keys are fastimds.sources.etcd_layout's, `{prefix}/hosts/{host}/vms/{vm}`;
  a key under the prefix that does not fit the layout is ignored by every
  command. A VM id is unique across the fleet, so `get`, `delete` and
  `move` find a VM by scanning every host's keys (keys only, paged, every
  page at the first page's revision R).
- Nothing is written that the host would refuse: the document goes through
  the server's own checks (fastimds.imds.datafile.parse_vm, the VM id and
  "id" rules and the size of fastimds.control.writer), and its caller
  addresses through the server's model (fastimds.control.model.VmModel)
  against the other VMs under the host. Every problem is named; a bad file
  or argument exits 2 before etcd is contacted. What is stored is the
  document as compact JSON.
- Every write is one transaction guarded by what was read at R: the key's
  mod_revision is still the one read (0: absent), so a write never clobbers
  a change made meanwhile (a concurrent move included); a `move` also
  requires the new key absent, and deletes and puts in one revision. A
  failed compare is "changed meanwhile" (exit 1): read again, try again.
  The guards make the client library's retries of a write safe.
- The race left: two `put`s of one new VM to two hosts at the same moment can
  both pass their scans. etcd 3.4 can compare a range (every key created
  before R+1 under `{prefix}/hosts/`), but that reads every VM of the fleet
  inside etcd's serial apply on each put, and fails on any VM created
  anywhere meanwhile; a VM's keys under the hosts are no one range. So it is
  check-then-write: `get`, `delete` and `move` name every key of a VM found
  twice (exit 1), and `ls` lists both. Likewise an address taken meanwhile
  on the host is refused by the host itself, and logged, as any bad value.
- Exit codes: 0 done; 1 refused, not found, changed meanwhile, or etcd
  failed (one line on stderr, fastimds.sources.etcd_client.describe_error);
  2 bad usage or a bad file. Every request is bounded by
  ETCD_REQUEST_TIMEOUT_S: an unreachable etcd is an exit 1, not a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from fastimds.cli.etcd_options import add_etcd_arguments, etcd_settings
from fastimds.config import ETCD_REQUEST_TIMEOUT_S, ConfigError, EtcdSettings
from fastimds.control.model import VmModel
from fastimds.control.writer import UpdateError, encoded_size
from fastimds.imds.datafile import MAX_VM_FILE_BYTES, VM_ID_PATTERN, DataError, VmDescription, parse_vm
from fastimds.imds.registry import ConflictError
from fastimds.sources.etcd_client import EtcdConnection, EtcdSetupError, connect, describe_error
from fastimds.sources.etcd_layout import FleetLayout

# Keys per page of a keys-only scan (a key and its revisions are ~100 bytes: far below gRPC's 4 MiB
# message), and descriptions per page of a value read (a few KiB each), as fastimds.sources.etcd pages.
SCAN_PAGE_KEYS = 1000
VALUE_PAGE_KEYS = 64


class FleetError(Exception):
    """A command refused or failed: `message` (and `problems`) for stderr, `code` to exit with."""

    def __init__(self, message: str, code: int = 1, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.problems = list(problems)


@dataclass(frozen=True, order=True)
class Found:
    host: str
    vm_id: str
    key: bytes
    mod_revision: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_etcd_arguments(parser, required=True)
    commands = parser.add_subparsers(dest="fleet_command", required=True)
    put = commands.add_parser("put", help="validate FILE, then write it as VM under HOST")
    put.add_argument("host")
    put.add_argument("vm_id")
    put.add_argument("file", help="a VM description (JSON), or - for standard input")
    for name, text in (("get", "the VM, the host holding it, its key and revision"), ("delete", "remove the VM")):
        commands.add_parser(name, help=text).add_argument("vm_id")
    move = commands.add_parser("move", help="move the VM to another host, in one transaction")
    move.add_argument("vm_id")
    move.add_argument("--to", required=True, metavar="HOST", dest="to_host")
    commands.add_parser("ls", help="VM ids: HOST's, or every host's as HOST VM").add_argument("host", nargs="?")
    commands.add_parser("hosts", help="every host with its VM count")


def run(args: argparse.Namespace) -> int:
    # gRPC's C core would log a failed TLS handshake on stderr itself, beside the one line this prints.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        settings = etcd_settings(args)
        if settings is None:
            raise ConfigError("--etcd needs at least one endpoint")
        request = _checked_request(args, FleetLayout(settings.prefix))
        if text := asyncio.run(_session(settings, args, request)):
            print(text)
    except ConfigError as exc:
        print(f"fastimds fleet: {exc}", file=sys.stderr)
        return 2
    except FleetError as exc:
        print(f"fastimds fleet: {exc.message}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return exc.code
    return 0


def _id_problem(vm_id: str) -> list[str]:
    if VM_ID_PATTERN.fullmatch(vm_id):
        return []
    return [f"{vm_id!r} is not a VM id (letters, digits, '.', '_', '-'; at most 128)"]


def _validated(vm_id: str, raw: bytes, source: str, code: int) -> VmDescription:
    """`raw` parsed, or FleetError(code) naming every problem the server's writer names one at a time
    (fastimds.control.writer.Control._put: the VM id, the document's "id", the size, parse_vm's)."""
    problems = _id_problem(vm_id)
    vm: VmDescription | None = None
    document: Any = None
    try:
        vm = parse_vm(raw, source)
        document = vm.document
    except DataError as exc:
        problems += exc.problems
        if len(raw) <= MAX_VM_FILE_BYTES:  # a refused document's "id" is named too
            with contextlib.suppress(orjson.JSONDecodeError):
                document = orjson.loads(raw)
    if isinstance(document, dict):
        if document.get("id", vm_id) != vm_id:
            problems.append(f"the document's id {document['id']!r} does not match the VM id {vm_id!r}")
        try:
            if encoded_size(document) > MAX_VM_FILE_BYTES:
                problems.append(f"a VM description is limited to {MAX_VM_FILE_BYTES} bytes")
        except UpdateError as exc:
            problems += exc.problems
    if problems or vm is None:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        raise FleetError(f"{source}: refused for VM {vm_id!r} ({count})", code, problems)
    return vm


def _read(file: str) -> bytes:
    """FILE's bytes (- is standard input), one past the limit at most: parse_vm names an oversized one."""
    try:
        if file == "-":
            return sys.stdin.buffer.read(MAX_VM_FILE_BYTES + 1)
        with open(file, "rb") as handle:
            return handle.read(MAX_VM_FILE_BYTES + 1)
    except OSError as exc:
        raise FleetError(f"cannot read {file}: {exc.strerror}", 2) from None


def _checked_request(args: argparse.Namespace, layout: FleetLayout) -> VmDescription | None:
    """The arguments checked before etcd is contacted (FleetError 2); for `put`, the validated description."""
    for host in (getattr(args, "host", None), getattr(args, "to_host", None)):
        if host is not None and (host.strip() != host or layout.parse(layout.vm_key(host, "vm")) != (host, "vm")):
            raise FleetError(f"{host!r} is not a host id (not empty, no '/', no surrounding spaces)", 2)
    if args.fleet_command == "put":
        return _validated(args.vm_id, _read(args.file), "<stdin>" if args.file == "-" else args.file, 2)
    if problems := _id_problem(getattr(args, "vm_id", None) or "x"):
        raise FleetError(problems[0], 2)
    return None


def _is_etcd_error(exc: BaseException) -> bool:
    """A failure of etcd or of the way to it (not a bug here): the library's, gRPC's, a timeout, a TLS file."""
    if isinstance(exc, (EtcdSetupError, TimeoutError, OSError)):
        return True
    return type(exc).__module__.partition(".")[0] in ("etcd3aio", "grpc")


async def _session(settings: EtcdSettings, args: argparse.Namespace, vm: VmDescription | None) -> str:
    try:
        connection = await connect(settings)
        try:
            return await Fleet(connection, FleetLayout(settings.prefix)).command(args, vm)
        finally:
            with contextlib.suppress(Exception):
                await connection.close()
    except Exception as exc:
        if not _is_etcd_error(exc):
            raise  # a refusal (FleetError), or a bug: its traceback is wanted
        raise FleetError(f"etcd at {','.join(settings.endpoints)}: {describe_error(exc)}") from None


def _shown(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


class Fleet:
    """The commands over one etcd client."""

    def __init__(self, connection: EtcdConnection, layout: FleetLayout) -> None:
        self.connection = connection
        self.kv = connection.kv
        self.layout = layout

    async def command(self, args: argparse.Namespace, vm: VmDescription | None) -> str:
        command = args.fleet_command
        if command == "put":
            assert vm is not None
            return await self.put(args.host, args.vm_id, vm)
        if command == "get":
            return await self.get(args.vm_id)
        if command == "delete":
            return await self.delete(args.vm_id)
        if command == "move":
            return await self.move(args.vm_id, args.to_host)
        _, found = await self.vm_keys(args.host if command == "ls" else None)
        if command == "ls":
            return "\n".join(item.vm_id if args.host else f"{item.host} {item.vm_id}" for item in found)
        counts = Counter(item.host for item in found)
        return "\n".join(f"{host} {count}" for host, count in sorted(counts.items()))

    # ---- reads ----

    async def pages(self, start: bytes, *, keys_only: bool, revision: int = 0) -> AsyncIterator[tuple[int, Any]]:
        """(R, key-values) per page of every key under `start`, all at one revision R (the first page's)."""
        page_keys = SCAN_PAGE_KEYS if keys_only else VALUE_PAGE_KEYS
        async for page in self.connection.pages(start, page_keys=page_keys, keys_only=keys_only, revision=revision):
            yield page

    async def vm_keys(self, host: str | None = None) -> tuple[int, list[Found]]:
        """R and every VM key at R, of `host` or of the fleet, sorted by host and VM."""
        revision, found = 0, []
        prefix = self.layout.host_prefix(host) if host else self.layout.hosts_prefix
        async for page_revision, kvs in self.pages(prefix, keys_only=True):
            revision = page_revision
            for kv in kvs:
                if (parsed := self.layout.parse(kv.key)) is not None and parsed[0] == (host or parsed[0]):
                    found.append(Found(*parsed, kv.key, kv.mod_revision))
        return revision, sorted(found)

    async def copies(self, vm_id: str) -> tuple[int, list[Found]]:
        """R and every key of `vm_id` at R: more than one only after a race (see the module rules)."""
        revision, found = await self.vm_keys()
        return revision, [item for item in found if item.vm_id == vm_id]

    async def the_one(self, vm_id: str) -> tuple[int, Found]:
        revision, found = await self.copies(vm_id)
        if not found:
            raise FleetError(f"no VM {vm_id!r} under any host")
        if len(found) > 1:
            keys = ", ".join(item.key.decode() for item in found)
            raise FleetError(f"VM {vm_id!r} is under {len(found)} hosts ({keys}): remove all but one (etcdctl del KEY)")
        return revision, found[0]

    async def value_at(self, found: Found, revision: int) -> bytes:
        reply = await self.kv.get(found.key, revision=revision, timeout=ETCD_REQUEST_TIMEOUT_S)
        if not reply.kvs:
            raise FleetError(f"{found.key.decode()} changed meanwhile: try again")
        return bytes(reply.kvs[0].value)

    async def check_addresses(self, host: str, vm_id: str, vm: VmDescription, revision: int) -> None:
        """FleetError naming the address and both VMs when `vm` claims one another VM under `host` claims."""
        model = VmModel()
        async for _, kvs in self.pages(self.layout.host_prefix(host), keys_only=False, revision=revision):
            for kv in kvs:
                other = self.layout.vm_of(host, kv.key)
                if other is not None and other != vm_id:
                    with contextlib.suppress(DataError, ConflictError):  # the host refuses these itself
                        model.set(other, parse_vm(kv.value, kv.key.decode()), 1, 0.0)
        try:
            model.check(vm_id, vm)
        except ConflictError as exc:
            raise FleetError(f"refused: under host {host}, {exc}") from None

    # ---- writes ----

    def unchanged(self, key: bytes, mod_revision: int) -> Any:
        """A compare: `key`'s mod_revision is `mod_revision` (0: absent). etcd3aio builds none: its
        create_revision compare, retargeted, is the same Compare message."""
        compare = self.kv.txn_compare_create_revision(key, 0)
        compare.target = compare.MOD
        compare.mod_revision = mod_revision
        return compare

    async def commit(self, vm_id: str, compares: list[Any], ops: list[Any]) -> int:
        """The transaction's revision; FleetError when a compare failed."""
        try:
            reply = await self.kv.txn(compares, ops, timeout=ETCD_REQUEST_TIMEOUT_S)
        except TimeoutError:
            raise FleetError(
                f"no answer from etcd within {ETCD_REQUEST_TIMEOUT_S:g} s; the change may have been made: "
                f"`fastimds fleet get {vm_id}` tells"
            ) from None
        if not reply.succeeded:
            raise FleetError(f"VM {vm_id!r} changed meanwhile: see `fastimds fleet get {vm_id}`, and try again")
        return int(reply.header.revision)

    async def put(self, host: str, vm_id: str, vm: VmDescription) -> str:
        revision, found = await self.copies(vm_id)
        for item in found:
            if item.host != host:
                raise FleetError(
                    f"VM {vm_id!r} lives under host {item.host} ({item.key.decode()}): a VM is under one host at "
                    f"a time; to move it: fastimds fleet move {vm_id} --to {host}"
                )
        await self.check_addresses(host, vm_id, vm, revision)
        key = self.layout.vm_key(host, vm_id)
        current = found[0].mod_revision if found else 0
        done = await self.commit(
            vm_id, [self.unchanged(key, current)], [self.kv.txn_op_put(key, orjson.dumps(vm.document))]
        )
        return _shown({"host": host, "vm": vm_id, "key": key.decode(), "revision": done})

    async def get(self, vm_id: str) -> str:
        revision, found = await self.the_one(vm_id)
        value = await self.value_at(found, revision)
        try:
            document: Any = orjson.loads(value)
        except orjson.JSONDecodeError:
            document = value.decode("utf-8", "replace")  # shown as it is: the host refuses it (and logs why)
        return _shown({"host": found.host, "key": found.key.decode(), "revision": found.mod_revision, "vm": document})

    async def delete(self, vm_id: str) -> str:
        _, found = await self.the_one(vm_id)
        done = await self.commit(
            vm_id, [self.unchanged(found.key, found.mod_revision)], [self.kv.txn_op_delete(found.key)]
        )
        return _shown({"host": found.host, "vm": vm_id, "deleted": found.key.decode(), "revision": done})

    async def move(self, vm_id: str, to_host: str) -> str:
        revision, found = await self.the_one(vm_id)
        if found.host == to_host:
            raise FleetError(f"VM {vm_id!r} is under host {to_host} already ({found.key.decode()})")
        value = await self.value_at(found, revision)
        vm = _validated(vm_id, value, found.key.decode(), 1)
        await self.check_addresses(to_host, vm_id, vm, revision)
        new = self.layout.vm_key(to_host, vm_id)
        compares = [self.unchanged(found.key, found.mod_revision), self.kv.txn_compare_version(new, 0)]
        done = await self.commit(vm_id, compares, [self.kv.txn_op_delete(found.key), self.kv.txn_op_put(new, value)])
        return _shown({"vm": vm_id, "from": found.key.decode(), "to": new.decode(), "revision": done})
