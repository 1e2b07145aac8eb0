"""Many VMs in one process: resident memory and build time.

The multi-VM issue's targets: 10,000 VMs of the sample's size resident in
at most 1 GiB RSS after each VM has been asked for its whole document and one
leaf in two api-versions, and a build of one VM in at most 1 ms (median).

    python -m bench.bench_scale [--vms 10000]

Each VM is the embedded sample with its own vmId, name, resource id, IP and
MAC addresses, parsed from its own JSON like a data file (so no strings are
shared between VMs that a real deployment would not share). RSS is VmRSS from
/proc/self/status: at start, after parsing the descriptions, after building
the snapshots, and after serving every VM its four requests through
fastimds.imds.routing.resolve. Exits 1 when a target is missed.

tests/unit/imds/test_scale.py runs the same code for a few hundred VMs and checks the
answers, not the numbers.
"""

from __future__ import annotations

import argparse
import importlib.resources
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

from fastimds.imds.datafile import SAMPLE_NAME, VmDescription, parse_vm
from fastimds.imds.render import Reply
from fastimds.imds.routing import resolve
from fastimds.imds.snapshot import Snapshot, build_snapshot

VERSIONS = ("2021-02-01", "2023-11-15")
LEAF = "compute/vmId"
RSS_BUDGET_BYTES = 1024**3
BUILD_BUDGET_NS = 1_000_000


def targets() -> list[bytes]:
    """The four requests each VM is asked: whole document and one text leaf, at two versions."""
    found = []
    for version in VERSIONS:
        found.append(f"/metadata/instance?api-version={version}".encode())
        found.append(f"/metadata/instance/{LEAF}?api-version={version}&format=text".encode())
    return found


def sample_document() -> dict[str, Any]:
    raw = importlib.resources.files("fastimds").joinpath(SAMPLE_NAME).read_bytes()
    document: dict[str, Any] = orjson.loads(raw)
    return document


def vm_document(sample: dict[str, Any], index: int) -> dict[str, Any]:
    """The sample made VM number `index`: its own identity and addresses."""
    document: dict[str, Any] = orjson.loads(orjson.dumps(sample))  # a deep copy
    compute = document["instance"]["compute"]
    name = f"scale-vm{index:05d}"
    compute["vmId"] = f"{index:08x}-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
    compute["name"] = name
    compute["osProfile"]["computerName"] = name
    compute["resourceId"] = compute["resourceId"].rsplit("/", 1)[0] + "/" + name
    # Every private address differs between VMs (they name the VM's callers):
    # 10.<block, interface, slot>.<index>, fd00:<interface>::<index>.
    block, rest = divmod(index, 65536)
    high, low = divmod(rest, 256)
    for number, interface in enumerate(document["instance"]["network"]["interface"]):
        interface["macAddress"] = f"6045{number:02X}{index:06X}"
        for slot, address in enumerate(interface["ipv4"]["ipAddress"]):
            address["privateIpAddress"] = f"10.{block * 16 + number * 4 + slot}.{high}.{low}"
        for address in interface["ipv6"]["ipAddress"]:
            address["privateIpAddress"] = f"fd00:{number}::{index:x}"
    return document


def make_vms(count: int) -> list[VmDescription]:
    sample = sample_document()
    return [parse_vm(orjson.dumps(vm_document(sample, index)), f"scale-vm{index:05d}") for index in range(count)]


def serve(snapshot: Snapshot, requests: list[bytes]) -> list[Reply]:
    return [resolve(snapshot, b"GET", target, True, False) for target in requests]


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass
class Result:
    vms: int
    rss_start: int
    rss_described: int
    rss_built: int
    rss_served: int
    build_median_ns: float
    first_serve_median_ns: float
    seconds: float

    @property
    def per_vm_bytes(self) -> float:
        return (self.rss_served - self.rss_start) / self.vms

    def report(self) -> str:
        mib = 1024 * 1024
        n = self.vms
        lines = [
            f"VMs: {n:,} (each asked {len(targets())} requests: whole document and {LEAF} at {', '.join(VERSIONS)})",
            f"RSS at start:                   {self.rss_start / mib:8.1f} MiB",
            f"RSS after parsing descriptions: {self.rss_described / mib:8.1f} MiB"
            f"  (+{(self.rss_described - self.rss_start) / n:,.0f} B per VM)",
            f"RSS after building snapshots:   {self.rss_built / mib:8.1f} MiB"
            f"  (+{(self.rss_built - self.rss_described) / n:,.0f} B per VM)",
            f"RSS after serving every VM:     {self.rss_served / mib:8.1f} MiB"
            f"  (+{(self.rss_served - self.rss_built) / n:,.0f} B per VM)",
            f"per VM, all of it:              {self.per_vm_bytes:8,.0f} B",
            f"build_snapshot median:          {self.build_median_ns / 1000:8.2f} µs",
            f"first four requests, median:    {self.first_serve_median_ns / 1000:8.2f} µs per VM (renders the views)",
            f"wall time:                      {self.seconds:8.1f} s",
        ]
        if n >= 10_000:
            met = "met" if self.rss_served <= RSS_BUDGET_BYTES else "NOT met"
            lines.append(f"target RSS <= 1 GiB for {n:,} VMs: {met}")
        met = "met" if self.build_median_ns <= BUILD_BUDGET_NS else "NOT met"
        lines.append(f"target build median <= 1 ms: {met}")
        return "\n".join(lines)


def run(count: int) -> tuple[Result, list[Snapshot], list[list[Reply]]]:
    """Build and serve `count` VMs; the snapshots and replies stay alive for the caller."""
    started = time.perf_counter()
    rss_start = rss_bytes()
    vms = make_vms(count)
    rss_described = rss_bytes()

    snapshots = []
    build_ns = []
    for generation, vm in enumerate(vms, start=1):
        before = time.perf_counter_ns()
        snapshot = build_snapshot(vm, generation)
        build_ns.append(time.perf_counter_ns() - before)
        snapshots.append(snapshot)
    del vms  # the snapshots hold them
    rss_built = rss_bytes()

    requests = targets()
    served = []
    serve_ns = []
    for snapshot in snapshots:
        before = time.perf_counter_ns()
        replies = serve(snapshot, requests)
        serve_ns.append(time.perf_counter_ns() - before)
        served.append(replies)
    rss_served = rss_bytes()

    result = Result(
        vms=count,
        rss_start=rss_start,
        rss_described=rss_described,
        rss_built=rss_built,
        rss_served=rss_served,
        build_median_ns=statistics.median(build_ns),
        first_serve_median_ns=statistics.median(serve_ns),
        seconds=time.perf_counter() - started,
    )
    return result, snapshots, served


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=10_000, help="how many VMs (default 10,000)")
    args = parser.parse_args(argv)
    result, snapshots, served = run(args.vms)
    # A number is only worth something if the answers were right.
    for snapshot, replies in zip(snapshots, served, strict=True):
        vm_id = snapshot.vm.instance["compute"]["vmId"].encode()
        assert all(reply.status == 200 for reply in replies), snapshot.vm.source
        assert replies[1].body == replies[3].body == vm_id, snapshot.vm.source
    print(result.report())
    met = result.build_median_ns <= BUILD_BUDGET_NS
    if args.vms >= 10_000:
        met = met and result.rss_served <= RSS_BUDGET_BYTES
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
