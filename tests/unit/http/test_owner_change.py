"""An open connection follows its caller address to a new owner (issue 16, Medium 1), without sockets.

The caller -> VM mapping is made when a connection opens. When the address
changes owner (it moves to another VM, a VM appears for a caller that got
the default VM, or its VM drops it), the registry tells the worker's state,
which re-maps that address's open connections before their next request:
the next reply, tokens included, is the new owner's. A long-poll held on
the old VM is answered at once with the new owner's current value.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from fastimds.http.connection import HttpProtocol
from fastimds.imds.datafile import VmDescription, describe_vm
from fastimds.imds.registry import VmRegistry
from tests.support.fakes import FakeTransport, make_connection, request, split_responses
from tests.support.identities import TENANT, claims
from tests.support.server_process import vm_document, vm_uuid

CALLER = "127.0.0.24"
GET_VMID = request("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text")
GET_TOKEN = request("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net")
WAIT_VMID = request("/metadata/instance/compute/vmId?api-version=2021-02-01&format=text&wait_for_change=true")


def object_id(vm_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{vm_id}.identity.fastimds.test"))


def vm(vm_id: str, callers: tuple[str, ...] = (), private_ips: tuple[str, ...] = ()) -> VmDescription:
    """VM `vm_id` with its own vmId and its own system-assigned identity."""
    document: dict[str, Any] = vm_document(vm_id, callers=callers, private_ips=private_ips)
    document["identities"] = {
        "tenantId": TENANT,
        "systemAssigned": {"clientId": object_id(vm_id + "-client"), "objectId": object_id(vm_id)},
    }
    return describe_vm(document, "test")


def replies(protocol: HttpProtocol, transport: FakeTransport, data: bytes) -> list[tuple[int, bytes]]:
    before = len(transport.output)
    protocol.data_received(data)
    return [(r.status, r.body) for r in split_responses(transport.output[before:])]


def token_oid(protocol: HttpProtocol, transport: FakeTransport) -> str:
    [(status, body)] = replies(protocol, transport, GET_TOKEN)
    assert status == 200, body
    return str(claims(orjson.loads(body)["access_token"])["oid"])


def test_an_open_connection_answers_as_the_new_owner_after_its_address_moves() -> None:
    # Regression: the mapping was made once per connection, so after 127.0.0.24 moved
    # from vm-04 to vm-05 an open keep-alive connection got vm-04's name and token.
    registry = VmRegistry()
    registry.publish("vm-04", vm("vm-04", callers=(CALLER,)))
    registry.publish("vm-05", vm("vm-05", callers=("127.0.0.25",)))
    protocol, transport, state = make_connection(registry=registry, peer=CALLER)
    assert replies(protocol, transport, GET_VMID) == [(200, vm_uuid("vm-04").encode())]
    assert replies(protocol, transport, GET_VMID) == [(200, vm_uuid("vm-04").encode())]  # from the memo now
    assert token_oid(protocol, transport) == object_id("vm-04")

    registry.publish("vm-04", vm("vm-04"))  # vm-04 lets the address go...
    registry.publish("vm-05", vm("vm-05", callers=("127.0.0.25", CALLER)))  # ...and vm-05 takes it

    assert replies(protocol, transport, GET_VMID) == [(200, vm_uuid("vm-05").encode())]
    assert token_oid(protocol, transport) == object_id("vm-05")
    assert not transport.ended  # re-mapped, not closed
    assert state.callers[CALLER] == {protocol}


def test_a_connection_that_got_the_default_vm_follows_its_own_vm_when_it_appears() -> None:
    registry = VmRegistry(default_vm_id="default")
    registry.publish("default", vm("default"))
    protocol, transport, _ = make_connection(registry=registry, peer=CALLER)
    assert replies(protocol, transport, GET_VMID) == [(200, vm_uuid("default").encode())]
    assert token_oid(protocol, transport) == object_id("default")

    registry.publish("vm-24", vm("vm-24", callers=(CALLER,)))
    assert replies(protocol, transport, GET_VMID) == [(200, vm_uuid("vm-24").encode())]
    assert token_oid(protocol, transport) == object_id("vm-24")

    registry.remove("vm-24")  # gone again: back to the default VM
    assert replies(protocol, transport, GET_VMID) == [(200, vm_uuid("default").encode())]


def test_only_the_moved_addresses_connections_are_re_mapped() -> None:
    registry = VmRegistry()
    registry.publish("a", vm("a", callers=(CALLER, "127.0.0.30")))
    moved, moved_transport, state = make_connection(registry=registry, peer=CALLER)
    stays = HttpProtocol(state)
    stays_transport = FakeTransport("127.0.0.30")
    stays.connection_made(stays_transport)
    store_a = registry.stores["a"]
    registry.publish("a", vm("a", callers=("127.0.0.30",)))
    registry.publish("b", vm("b", callers=(CALLER,)))
    assert moved.vm is registry.stores["b"]
    assert stays.vm is store_a
    assert replies(stays, stays_transport, GET_VMID) == [(200, vm_uuid("a").encode())]
    assert replies(moved, moved_transport, GET_VMID) == [(200, vm_uuid("b").encode())]


def test_a_long_poll_held_on_the_old_owner_is_released_not_left_on_it() -> None:
    registry = VmRegistry()
    registry.publish("vm-04", vm("vm-04", callers=(CALLER,)))
    protocol, transport, _ = make_connection(registry=registry, peer=CALLER)
    old = registry.stores["vm-04"]
    assert replies(protocol, transport, WAIT_VMID) == []  # held
    assert protocol in old.watchers

    registry.publish("vm-04", vm("vm-04"))  # the address is nobody's now: the no-VM 404, at once
    [released] = split_responses(transport.output)
    assert released.status == 404
    assert protocol not in old.watchers and protocol.hold is None
    registry.publish("vm-04", vm("vm-04", private_ips=("10.9.0.4",)))  # the old VM's changes no longer reach it
    assert len(split_responses(transport.output)) == 1


def test_a_held_long_poll_moves_straight_to_the_new_owners_value() -> None:
    registry = VmRegistry(default_vm_id="default")
    registry.publish("default", vm("default"))
    protocol, transport, _ = make_connection(registry=registry, peer=CALLER)
    assert replies(protocol, transport, WAIT_VMID) == []  # held on the default VM
    assert protocol in registry.stores["default"].watchers
    before = len(transport.output)
    registry.publish("vm-24", vm("vm-24", callers=(CALLER,)))
    released = split_responses(transport.output[before:])
    assert [(r.status, r.body) for r in released] == [(200, vm_uuid("vm-24").encode())]
    assert protocol not in registry.stores["default"].watchers
    assert protocol.hold is None and transport.reading
    # The default VM's next change does not touch it.
    after = len(transport.output)
    registry.publish("default", vm("default", private_ips=("10.9.0.4",)))
    assert len(transport.output) == after
    assert replies(protocol, transport, GET_VMID) == [(200, vm_uuid("vm-24").encode())]
