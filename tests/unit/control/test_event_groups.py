"""Issue 16, Medium 2: an approval acts only within its event's own group.

An event's group is the set of VMs it was added to, stored with it on the
bus; an approval names the VM that sent it and starts that VM's event on
that group only. A scale set is subscriptionId + resourceGroupName +
vmScaleSetName. An EventId held outside the group it is added to is a 409.
"""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import orjson
import pytest

from fastimds.bus.files import Bus
from fastimds.control.admin_api import AdminApi
from fastimds.control.plane import ControlPlane
from fastimds.control.writer import Control, UpdateError
from fastimds.imds import events
from tests.support.fakes import admin_api, serving, split_responses
from tests.support.server_process import vm_document

NOW = 2_000_000_000.0
LATER = {"EventType": "Reboot", "NotBefore": formatdate(NOW + 900, usegmt=True), "StartedForSeconds": 60}


def status_of(control: Control, vm_id: str) -> dict[str, str]:
    return {event["EventId"]: event["EventStatus"] for event in control.events_of(vm_id)["Events"]}


def scale_set_vm(vm_id: str, caller: str, scale_set: str, resource_group: str, subscription: str) -> dict[str, Any]:
    document = vm_document(vm_id, callers=[caller])
    compute = document["instance"]["compute"]
    compute.update(vmScaleSetName=scale_set, resourceGroupName=resource_group, subscriptionId=subscription)
    return document


def two_tenants(control: Control) -> None:
    """Two tenants, each with a scale set called "web" (different resource groups and subscriptions)."""
    for index, vm_id in enumerate(("a1", "a2")):
        control.put(vm_id, scale_set_vm(vm_id, f"10.1.0.{index + 4}", "web", "rg-a", "sub-a"))
    for index, vm_id in enumerate(("b1", "b2")):
        control.put(vm_id, scale_set_vm(vm_id, f"10.2.0.{index + 4}", "web", "rg-b", "sub-b"))


def test_an_eventid_reused_outside_its_group_is_409_and_changes_nothing(plane: ControlPlane, control: Control) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    control.put("b", vm_document("b", callers=["10.2.0.4"]))
    plane.clock.add_event(["a"], {**LATER, "EventId": "E1"})
    before = control.generation("b")
    with pytest.raises(UpdateError) as refused:
        plane.clock.add_event(["b"], {**LATER, "EventId": "E1"})
    assert refused.value.status == 409 and "outside this group" in refused.value.message
    with pytest.raises(UpdateError) as refused:  # a group that takes in the holder is still a different event
        plane.clock.add_event(["b", "a"], {**LATER, "EventId": "E1"})
    assert refused.value.status == 409
    assert control.generation("b") == before and status_of(control, "b") == {}


def test_same_eventid_on_two_vms_from_their_descriptions_is_approved_apart(
    plane: ControlPlane, control: Control
) -> None:
    """Regression (issue 16): one VM's approval started another VM's event of the same EventId."""
    for vm_id, caller in (("a", "10.1.0.4"), ("b", "10.2.0.4")):
        control.put(vm_id, {**vm_document(vm_id, callers=[caller]), "scheduledEvents": [{**LATER, "EventId": "E1"}]})
    assert control.events_of("a")["Events"][0]["group"] == ["a"]  # a description's events are its VM's own
    plane.clock.approve({"a": frozenset({"E1"})})
    assert (status_of(control, "a"), status_of(control, "b")) == ({"E1": "Started"}, {"E1": "Scheduled"})


def test_an_event_stored_before_groups_is_its_own_vms_only(plane: ControlPlane, control: Control) -> None:
    """Older bus files have no "group": the safe reading, its holder alone."""
    for vm_id, caller in (("a", "10.1.0.4"), ("b", "10.2.0.4")):
        control.put(vm_id, vm_document(vm_id, callers=[caller]))
        legacy = events.make_event({**LATER, "EventId": "E1"}, NOW, ["a-name", "b-name"])  # no group
        assert "group" not in legacy
        control.write_events(vm_id, events.add(None, legacy))
    plane.clock.approve({"b": frozenset({"E1"})})
    assert (status_of(control, "a"), status_of(control, "b")) == ({"E1": "Scheduled"}, {"E1": "Started"})


def test_a_group_approval_starts_its_group_and_nothing_else(plane: ControlPlane, control: Control) -> None:
    for index, vm_id in enumerate(("w1", "w2", "w3", "outsider")):
        control.put(vm_id, vm_document(vm_id, callers=[f"10.1.0.{index + 4}"]))
    event_id, _ = plane.clock.add_event(["w1", "w2", "w3"], LATER)
    assert control.events_of("w1")["Events"][0]["group"] == ["w1", "w2", "w3"]
    plane.clock.approve({"outsider": frozenset({event_id})})  # a VM that does not hold it approves nothing
    assert {vm_id: status_of(control, vm_id) for vm_id in ("w1", "w2", "w3")} == {
        vm_id: {event_id: "Scheduled"} for vm_id in ("w1", "w2", "w3")
    }
    plane.clock.cancel_event(event_id, "w3")  # w3 leaves the event
    plane.clock.approve({"w1": frozenset({event_id})})
    assert [status_of(control, vm_id) for vm_id in ("w1", "w2", "w3", "outsider")] == [
        {event_id: "Started"},
        {event_id: "Started"},
        {},
        {},
    ]


def test_the_group_travels_through_the_bus_and_a_bad_one_is_named(
    plane: ControlPlane, control: Control, bus: Bus
) -> None:
    control.put("a", vm_document("a", callers=["10.1.0.4"]))
    plane.clock.add_event(["a"], {**LATER, "EventId": "E1"})
    entry = bus.read("a")
    assert entry is not None and entry.events is not None
    assert entry.events["Events"][0]["group"] == ["a"]
    assert events.state_problems(orjson.loads(orjson.dumps(entry.events))) == []
    for bad in ([], "a", [1], [""]):
        broken = {**entry.events, "Events": [{**entry.events["Events"][0], "group": bad}]}
        assert events.state_problems(broken) == [
            "events.Events[0].group: a non-empty array of VM ids (or absent: its own VM)"
        ]


def test_scale_sets_are_matched_on_subscription_group_and_name(plane: ControlPlane, control: Control) -> None:
    two_tenants(control)
    with pytest.raises(UpdateError) as refused:
        plane.clock.vms_in_scale_set("web")  # two scale sets named "web": ambiguous, never merged
    assert refused.value.status == 409 and len(refused.value.problems) == 2
    assert plane.clock.vms_in_scale_set("web", "sub-a", "rg-a") == ["a1", "a2"]
    assert plane.clock.vms_in_scale_set("web", resource_group="rg-b") == ["b1", "b2"]
    assert plane.clock.vms_in_scale_set("web", "sub-a", "rg-b") == []
    control.delete("b1")
    control.delete("b2")
    assert plane.clock.vms_in_scale_set("web") == ["a1", "a2"]  # one scale set of that name: the name suffices


def admin(api: AdminApi, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    [response] = split_responses(api.handle(method, path, None, orjson.dumps(body), False))
    return response.status, response.json()


def test_admin_keeps_two_tenants_web_scale_sets_apart(plane: ControlPlane, control: Control) -> None:
    two_tenants(control)
    api = admin_api(plane)
    status, body = admin(api, "POST", "/scheduledevents", {**LATER, "vmScaleSetName": "web"})
    assert status == 409 and "resourceGroupName" in body["error"]
    assert all(status_of(control, vm_id) == {} for vm_id in ("a1", "a2", "b1", "b2"))
    scope = {"vmScaleSetName": "web", "subscriptionId": "sub-a", "resourceGroupName": "rg-a"}
    status, body = admin(api, "POST", "/scheduledevents", {**LATER, **scope})
    assert status == 201 and sorted(body["generations"]) == ["a1", "a2"]
    event_id = body["EventId"]
    [event] = control.events_of("a1")["Events"]
    assert event["Resources"] == ["a1-name", "a2-name"]  # never the other tenant's names
    assert (status_of(control, "b1"), status_of(control, "b2")) == ({}, {})
    snapshot = serving(control).stores["b1"].current
    assert snapshot is not None and snapshot.vm.scheduled in (None, events.EMPTY_STATE)
    status, body = admin(api, "POST", "/scheduledevents", {**LATER, "vms": ["b1"], "EventId": event_id})
    assert status == 409  # the other tenant cannot be given the same EventId
    status, body = admin(api, "POST", "/scheduledevents", {**LATER, "resourceGroupName": "rg-a"})
    assert status == 400  # a scope without a name
