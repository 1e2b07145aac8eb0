"""VmRegistry without sockets: which VM a caller is, conflicts, and isolation at the protocol level.

A caller is its source address alone (with its zone, for a link-local IPv6
address): every private IP of a VM's NICs (IPv4 and IPv6) plus its "callers" list. No address belongs to two VMs, and no
connection from one VM's address can ever read another VM's data.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastimds.imds.datafile import VmDescription, describe_vm
from fastimds.imds.registry import ConflictError, VmRegistry, caller_addresses, caller_key, canonical_address
from fastimds.imds.store import DEFAULT_VM_ID
from tests.support.fakes import FakeTransport, make_connection, request, sample_vm, split_responses
from tests.support.server_process import vm_document, vm_uuid

NO_VM_BODY = {"error": "Not found. No VM is registered for this caller's address"}
GET_INSTANCE = request("/metadata/instance?api-version=2021-02-01")
GET_VMID_TEXT = request("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text")
GET_COMPUTE = request("/metadata/instance/compute?api-version=2019-06-01")


def describe(document: dict[str, Any]) -> VmDescription:
    return describe_vm(document, "test")


def vm(vm_id: str, callers: tuple[str, ...] = (), private_ips: tuple[str, ...] = (), **kw: Any) -> VmDescription:
    return describe(vm_document(vm_id, callers=callers, private_ips=private_ips, **kw))


def ask(registry: VmRegistry, peer: str, *requests: bytes) -> list[tuple[int, bytes]]:
    """Send `requests` on one connection from `peer`; returns (status, body) of each reply."""
    protocol, transport, _ = make_connection(registry=registry, peer=peer)
    for data in requests:
        protocol.data_received(data)
    return [(response.status, response.body) for response in split_responses(transport.output)]


def vm_id_seen(registry: VmRegistry, peer: str) -> str | None:
    """The compute.vmId a connection from `peer` is served, or None on the no-VM 404."""
    [(status, body)] = ask(registry, peer, GET_INSTANCE)
    if status == 404:
        assert orjson.loads(body) == NO_VM_BODY
        return None
    assert status == 200, body
    return str(orjson.loads(body)["compute"]["vmId"])


def two_vms() -> VmRegistry:
    registry = VmRegistry()
    registry.publish("a", vm("a", callers=("10.1.9.9",), private_ips=("10.1.0.4", "fd00:1::4")))
    registry.publish("b", vm("b", private_ips=("10.2.0.4",)))
    return registry


# ---- caller addresses ----


def test_caller_addresses_are_every_private_ip_and_the_callers_list() -> None:
    document = vm_document("a", callers=["127.0.0.2", "::ffff:10.2.0.9", "FD00:0:0::0009"])
    interfaces = document["instance"]["network"]["interface"]
    interfaces[0]["ipv4"]["ipAddress"] = [
        {"privateIpAddress": "10.1.0.4", "publicIpAddress": "20.61.15.7"},
        {"privateIpAddress": "", "publicIpAddress": "20.61.15.8"},  # "" is Azure's "no value": ignored
        {"publicIpAddress": "20.61.15.9"},  # no private address at all
    ]
    interfaces[0]["ipv6"]["ipAddress"] = [{"privateIpAddress": "FD00:10:0::4"}, {"privateIpAddress": ""}]
    interfaces[1]["ipv4"]["ipAddress"] = [{"privateIpAddress": "::ffff:10.1.1.4", "publicIpAddress": ""}]
    addresses = caller_addresses(describe(document))
    assert addresses == {"10.1.0.4", "fd00:10::4", "10.1.1.4", "127.0.0.2", "10.2.0.9", "fd00::9"}
    assert "20.61.15.7" not in addresses  # public addresses never identify a caller


def test_caller_addresses_of_the_sample_vm() -> None:
    assert caller_addresses(vm("s")) == frozenset()  # vm_document drops the sample's own addresses
    assert caller_addresses(sample_vm()) == {"10.0.0.4", "10.0.0.5", "fd00:10::4", "10.0.1.4"}


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("10.0.0.4", "10.0.0.4"),
        ("::ffff:10.0.0.4", "10.0.0.4"),
        ("::FFFF:10.0.0.4", "10.0.0.4"),
        ("FD00:0010:0000::0004", "fd00:10::4"),
        ("fe80::1%2", "fe80::1%2"),
        ("FE80:0::1%02", "fe80::1%2"),
        ("fe80::1", None),  # a link-local address names no caller without its link
        ("fe80::1%eth0", None),  # zones are interface indexes (fastimds.imds.registry)
        ("fd00::1%2", "fd00::1"),  # a global address is the same on every link
        ("", None),
        ("not-an-address", None),
        ("10.0.0.256", None),
    ],
)
def test_canonical_address(spelling: str, canonical: str | None) -> None:
    assert canonical_address(spelling) == canonical


@pytest.mark.parametrize(
    ("peername", "key"),
    [
        (("10.0.0.4", 40000), "10.0.0.4"),
        (("::ffff:10.0.0.4", 40000, 0, 0), "10.0.0.4"),
        (("fd00:1::4", 40000, 0, 0), "fd00:1::4"),
        (("fd00:1::4", 40000, 0, 4), "fd00:1::4"),
        (("fe80::1", 40000, 0, 2), "fe80::1%2"),
        (("fe80::1", 40000, 0, 3), "fe80::1%3"),
        (("fe80::1%eth0", 40000, 0, 4), "fe80::1%4"),  # a platform that also spells the zone in the host
        (("::1", 40000, 0, 0), "::1"),
        ("/run/fastimds.sock", ""),
        (None, ""),
    ],
)
def test_caller_key_of_a_peername(peername: object, key: str) -> None:
    assert caller_key(peername) == key


def test_link_local_callers_on_different_links_are_different_vms() -> None:
    # Regression (issue 16, item 10): callers were keyed without their zone, so fe80::1 on
    # eth0 and fe80::1 on eth1 (two tenants' links) were one caller, and one VM's.
    registry = VmRegistry()
    registry.publish("a", vm("a", callers=("fe80::1%2",)))
    registry.publish("b", vm("b", callers=("fe80::1%3",)))
    assert registry.store_for(caller_key(("fe80::1", 40000, 0, 2))) is registry.stores["a"]
    assert registry.store_for(caller_key(("fe80::1", 40000, 0, 3))) is registry.stores["b"]
    assert registry.store_for(caller_key(("fe80::1", 40000, 0, 4))) is registry.nobody
    assert registry.summary()[0]["callers"] == ["fe80::1%2"]


def test_a_connection_is_keyed_by_its_peers_address_and_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real connection: asyncio's IPv6 peername is (host, port, flowinfo, scope_id)."""

    def ipv6_peername(transport: FakeTransport, name: str, default: Any = None) -> Any:
        host, _, zone = transport.peer.partition("%")
        return (host, 40000, 0, int(zone or 0)) if name == "peername" else default

    monkeypatch.setattr(FakeTransport, "get_extra_info", ipv6_peername)
    registry = VmRegistry()
    registry.publish("a", vm("a", callers=("fe80::1%2",)))
    registry.publish("b", vm("b", callers=("fe80::1%3",)))
    assert vm_id_seen(registry, "fe80::1%2") == vm_uuid("a")
    assert vm_id_seen(registry, "fe80::1%3") == vm_uuid("b")
    assert vm_id_seen(registry, "fe80::1%4") is None


def test_store_for_canonicalises_the_peer_address() -> None:
    registry = two_vms()
    a = registry.stores["a"]
    for peer in ("10.1.0.4", "::ffff:10.1.0.4", "10.1.9.9", "::ffff:10.1.9.9", "fd00:1::4", "FD00:1:0::4"):
        assert registry.store_for(peer) is a, peer
    assert registry.store_for("10.2.0.4") is registry.stores["b"]


# ---- conflicts ----


def test_conflict_is_refused_naming_both_vms_and_changes_nothing() -> None:
    registry = two_vms()
    a, b = registry.stores["a"], registry.stores["b"]
    before = (registry.summary(), dict(registry.callers), dict(registry.addresses), a.current, b.current)

    with pytest.raises(ConflictError) as caught:
        registry.publish("b", vm("b", private_ips=("10.2.0.4", "10.1.0.4")))
    message = str(caught.value)
    assert "10.1.0.4" in message
    assert "'a'" in message
    assert "'b'" in message

    with pytest.raises(ConflictError) as caught:
        registry.publish("c", vm("c", callers=("::ffff:10.1.9.9",)))
    assert "'a'" in str(caught.value)
    assert "'c'" in str(caught.value)

    assert (registry.summary(), dict(registry.callers), dict(registry.addresses), a.current, b.current) == before
    assert a.generation == b.generation == 1
    assert "c" not in registry.live()
    assert registry.store_for("10.1.0.4") is a
    assert registry.store_for("10.2.0.4") is b
    assert vm_id_seen(registry, "10.1.0.4") == vm_uuid("a")
    assert vm_id_seen(registry, "10.2.0.4") == vm_uuid("b")


def test_check_refuses_what_publish_would_refuse() -> None:
    registry = two_vms()
    with pytest.raises(ConflictError):
        registry.check("b", vm("b", private_ips=("10.1.0.4",)))
    assert registry.check("a", vm("a", private_ips=("10.1.0.4", "10.1.0.5"))) == {"10.1.0.4", "10.1.0.5"}


def test_moving_an_address_between_vms() -> None:
    registry = two_vms()
    # B cannot take A's address while A holds it...
    with pytest.raises(ConflictError):
        registry.publish("b", vm("b", private_ips=("10.2.0.4", "10.1.0.4")))
    # ...but can once A lets it go.
    registry.publish("a", vm("a", callers=("10.1.9.9",), private_ips=("fd00:1::4",)))
    assert registry.store_for("10.1.0.4") is registry.nobody
    registry.publish("b", vm("b", private_ips=("10.2.0.4", "10.1.0.4")))
    assert registry.store_for("10.1.0.4") is registry.stores["b"]
    assert vm_id_seen(registry, "10.1.0.4") == vm_uuid("b")
    assert vm_id_seen(registry, "10.1.9.9") == vm_uuid("a")
    assert registry.summary() == [
        {"id": "a", "generation": 2, "callers": ["10.1.9.9", "fd00:1::4"]},
        {"id": "b", "generation": 2, "callers": ["10.1.0.4", "10.2.0.4"]},
    ]


def test_republishing_drops_addresses_no_longer_claimed() -> None:
    registry = two_vms()
    registry.publish("a", vm("a", callers=("10.1.9.8",)))
    assert set(registry.callers) == {"10.1.9.8", "10.2.0.4"}
    for gone in ("10.1.0.4", "10.1.9.9", "fd00:1::4"):
        assert registry.store_for(gone) is registry.nobody
        assert vm_id_seen(registry, gone) is None


# ---- remove ----


def test_remove() -> None:
    registry = two_vms()
    a = registry.stores["a"]
    assert registry.remove("a") is True
    assert a.current is None
    assert set(registry.live()) == {"b"}
    assert set(registry.callers) == {"10.2.0.4"}
    for address in ("10.1.0.4", "10.1.9.9", "fd00:1::4"):
        assert registry.store_for(address) is registry.nobody
        assert vm_id_seen(registry, address) is None
    assert registry.remove("a") is False
    assert registry.remove("never-there") is False
    # A's addresses are free for another VM now; A's generation is kept for when it returns.
    registry.publish("b", vm("b", private_ips=("10.2.0.4", "10.1.0.4")))
    assert vm_id_seen(registry, "10.1.0.4") == vm_uuid("b")
    registry.publish("a", vm("a", callers=("10.1.9.9",)))
    assert a.generation == 2
    assert registry.stores["a"] is a


def test_a_connection_of_a_removed_vm_gets_404_then_sees_it_again() -> None:
    registry = two_vms()
    protocol, transport, _ = make_connection(registry=registry, peer="10.1.9.9")
    protocol.data_received(GET_VMID_TEXT)
    registry.remove("a")
    protocol.data_received(GET_VMID_TEXT)
    registry.publish("a", vm("a", callers=("10.1.9.9",), location="northeurope"))
    protocol.data_received(GET_VMID_TEXT)
    responses = split_responses(transport.output)
    assert [r.status for r in responses] == [200, 404, 200]
    assert responses[0].body == responses[2].body == vm_uuid("a").encode()
    assert responses[1].json() == NO_VM_BODY


# ---- callers no VM claims ----


def test_unknown_caller_gets_nobody_without_a_default() -> None:
    registry = two_vms()
    for address in ("10.3.0.1", "127.0.0.1", "::1", "", "garbage", None):
        assert registry.store_for(address) is registry.nobody
    assert registry.nobody.current is None
    assert registry.default is registry.nobody


def test_unknown_caller_gets_the_default_vm() -> None:
    registry = VmRegistry(default_vm_id="d")
    registry.publish("a", vm("a", private_ips=("10.1.0.4",)))
    default = registry.store_for("10.3.0.1")
    assert default is registry.default
    assert default.vm_id == "d"
    assert default.current is None  # configured but not published yet: 404
    assert vm_id_seen(registry, "10.3.0.1") is None
    registry.publish("d", vm("d", private_ips=("10.4.0.4",)))
    assert registry.store_for("10.3.0.1") is registry.stores["d"]
    assert vm_id_seen(registry, "10.3.0.1") == vm_uuid("d")
    assert vm_id_seen(registry, "10.1.0.4") == vm_uuid("a")  # a claimed address still gets its own VM
    assert registry.store_for(None) is registry.stores["d"]


def test_single_vm_mode_answers_every_caller() -> None:
    registry = VmRegistry.single(vm("only", private_ips=("10.1.0.4",)))
    assert set(registry.live()) == {DEFAULT_VM_ID}
    for peer in ("10.1.0.4", "10.9.9.9", "127.0.0.1", "::1"):
        assert vm_id_seen(registry, peer) == vm_uuid("only")


# ---- isolation at the protocol level ----


def test_each_connection_gets_its_own_vm_and_never_another() -> None:
    registry = two_vms()
    registry.publish("c", vm("c", callers=("127.0.0.4",)))
    owners = {"10.1.0.4": "a", "10.1.9.9": "a", "fd00:1::4": "a", "::ffff:10.1.0.4": "a", "10.2.0.4": "b"}
    owners["127.0.0.4"] = "c"
    # The same request bytes from each caller in turn: the per-snapshot request memo must not leak.
    for _ in range(3):
        for peer, owner in owners.items():
            replies = ask(registry, peer, GET_INSTANCE, GET_VMID_TEXT, GET_COMPUTE, GET_INSTANCE + GET_VMID_TEXT)
            assert [status for status, _ in replies] == [200] * 5, (peer, replies)
            assert replies[1][1] == replies[4][1] == vm_uuid(owner).encode()
            for _status, body in replies:
                for other in {"a", "b", "c"} - {owner}:
                    assert vm_uuid(other).encode() not in body, (peer, other)
            assert orjson.loads(replies[0][1])["compute"]["vmId"] == vm_uuid(owner)
            assert orjson.loads(replies[2][1])["vmId"] == vm_uuid(owner)


def test_unknown_peer_gets_404_json() -> None:
    registry = two_vms()
    protocol, transport, _ = make_connection(registry=registry, peer="10.3.0.1")
    protocol.data_received(GET_INSTANCE + GET_VMID_TEXT + GET_COMPUTE)
    responses = split_responses(transport.output)
    assert [r.status for r in responses] == [404, 404, 404]
    for response in responses:
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        assert response.json() == NO_VM_BODY
    assert not transport.ended  # a 404 is an answer, not a reason to hang up
    # /metadata/versions does not depend on the VM.
    [(status, _body)] = ask(registry, "10.3.0.1", request("/metadata/versions"))
    assert status == 200


def test_a_connection_keeps_its_vm_across_other_vms_updates() -> None:
    registry = two_vms()
    protocol, transport, _ = make_connection(registry=registry, peer="10.1.0.4")
    protocol.data_received(GET_VMID_TEXT)
    registry.publish("b", vm("b", private_ips=("10.2.0.4",), location="northeurope"))
    registry.publish("a", vm("a", callers=("10.1.9.9",), private_ips=("10.1.0.4",), location="eastus"))
    protocol.data_received(request("/metadata/instance/compute/location?api-version=2021-02-01&format=text"))
    responses = split_responses(transport.output)
    assert [(r.status, r.body) for r in responses] == [(200, vm_uuid("a").encode()), (200, b"eastus")]


def test_a_held_long_poll_wakes_only_for_its_own_vm() -> None:
    registry = two_vms()
    wait = request("/metadata/instance/compute/location?api-version=2021-02-01&format=text&wait_for_change=true")
    a_conn, a_transport, _ = make_connection(registry=registry, peer="10.1.0.4")
    b_conn, b_transport, _ = make_connection(registry=registry, peer="10.2.0.4")
    a_conn.data_received(wait)
    b_conn.data_received(wait)
    assert a_transport.output == b_transport.output == b""  # both held
    registry.publish("b", vm("b", private_ips=("10.2.0.4",), location="b-moved"))
    assert a_transport.output == b""
    assert [(r.status, r.body) for r in split_responses(b_transport.output)] == [(200, b"b-moved")]
    registry.publish("a", vm("a", callers=("10.1.9.9",), private_ips=("10.1.0.4", "fd00:1::4"), location="a-moved"))
    assert [(r.status, r.body) for r in split_responses(a_transport.output)] == [(200, b"a-moved")]
    assert [(r.status, r.body) for r in split_responses(b_transport.output)] == [(200, b"b-moved")]


# ---- a randomised isolation property ----

POOL = [f"10.{n // 4}.0.{n % 4 + 1}" for n in range(12)] + [f"fd00:{n}::1" for n in range(4)]


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[tuple[list[str], list[str]]], list[str]]:
    """Several VMs, each with (NIC addresses, callers) drawn from POOL without overlap, and peers to try."""
    count = draw(st.integers(min_value=1, max_value=5))
    # Each pool address goes to one VM, or to nobody (-1), and into the NICs or the callers list.
    owner = draw(st.lists(st.integers(min_value=-1, max_value=count - 1), min_size=len(POOL), max_size=len(POOL)))
    in_callers = draw(st.lists(st.booleans(), min_size=len(POOL), max_size=len(POOL)))
    vms: list[tuple[list[str], list[str]]] = [([], []) for _ in range(count)]
    for address, index, as_caller in zip(POOL, owner, in_callers, strict=True):
        if index >= 0:
            vms[index][1 if as_caller else 0].append(address)
    mapped = [f"::ffff:{address}" for address in POOL if ":" not in address]
    peers = draw(st.lists(st.sampled_from([*POOL, *mapped, "10.99.0.1", "fd00:99::1"]), min_size=1, max_size=8))
    return vms, peers


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans())
def test_every_reply_belongs_to_the_callers_vm(
    layout: tuple[list[tuple[list[str], list[str]]], list[str]], with_default: bool
) -> None:
    vms, peers = layout
    registry = VmRegistry(default_vm_id="vm0" if with_default else None)
    owner_of: dict[str, str] = {}
    for index, (nic_addresses, callers) in enumerate(vms):
        vm_id = f"vm{index}"
        registry.publish(vm_id, vm(vm_id, callers=tuple(callers), private_ips=tuple(nic_addresses)))
        for address in [*nic_addresses, *callers]:
            owner_of[address] = vm_id
    for peer in peers:
        expected = owner_of.get(peer.removeprefix("::ffff:"), "vm0" if with_default else None)
        replies = ask(registry, peer, GET_INSTANCE, GET_VMID_TEXT, GET_INSTANCE)
        if expected is None:
            assert [status for status, _ in replies] == [404, 404, 404]
            assert all(orjson.loads(body) == NO_VM_BODY for _, body in replies)
            continue
        assert [status for status, _ in replies] == [200, 200, 200], (peer, replies)
        assert orjson.loads(replies[0][1])["compute"]["vmId"] == vm_uuid(expected), peer
        assert replies[1][1] == vm_uuid(expected).encode(), peer
        assert replies[2][1] == replies[0][1]
