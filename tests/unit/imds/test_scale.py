"""bench.bench_scale's workload, small: many distinct VMs, each answered from its own document."""

from __future__ import annotations

import orjson

from bench.bench_scale import VERSIONS, run, sample_document, targets, vm_document
from fastimds.imds.datafile import normalise
from tests.support.reference import reference_gate

VMS = 200


def test_many_vms_each_get_their_own_answers() -> None:
    result, snapshots, served = run(VMS)
    assert result.vms == VMS
    sample = sample_document()
    requests = targets()
    assert len(requests) == 2 * len(VERSIONS)
    for index, (snapshot, replies) in enumerate(zip(snapshots, served, strict=True)):
        instance = normalise(vm_document(sample, index)["instance"])
        for number, version in enumerate(VERSIONS):
            whole, leaf = replies[2 * number], replies[2 * number + 1]
            assert whole.status == 200
            assert orjson.loads(whole.body) == reference_gate(instance, "", version), (index, version)
            assert (leaf.status, leaf.body) == (200, instance["compute"]["vmId"].encode()), (index, version)
        # Each target was answered once, then remembered.
        assert set(snapshot.url_replies) == set(requests)
    # Distinct documents: every VM has its own identity and addresses.
    identities = {snapshot.vm.instance["compute"]["vmId"] for snapshot in snapshots}
    addresses = [
        address["privateIpAddress"]
        for snapshot in snapshots
        for interface in snapshot.vm.instance["network"]["interface"]
        for family in ("ipv4", "ipv6")
        for address in interface[family]["ipAddress"]
    ]
    assert len(identities) == VMS
    assert len(set(addresses)) == len(addresses)
