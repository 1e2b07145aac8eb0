"""VM description files: every problem is reported with its JSON path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from fastimds.imds.datafile import MAX_NESTING_DEPTH, MAX_VM_FILE_BYTES, DataError, load_vm, parse_vm
from tests.support.fakes import sample_vm

INSTANCE = orjson.loads(orjson.dumps(sample_vm().instance))


def problems_of(doc: Any) -> list[str]:
    with pytest.raises(DataError) as caught:
        parse_vm(orjson.dumps(doc), "test.json")
    return caught.value.problems


def test_the_embedded_sample_is_valid_and_all_strings() -> None:
    vm = load_vm(None)
    assert vm.instance["compute"]["vmId"] == "b1f2c3d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
    # hasCustomData is a JSON boolean, as cloud-init reads it (spec §3.7): the sample carries one.
    assert vm.document["extended"]["compute"]["hasCustomData"] is False
    assert vm.extended == {"compute": {"ppsType": "None", "hasCustomData": False}}


def test_extended_values_keep_the_json_types_the_file_gives_them() -> None:
    # cloud-init tests extended.compute.hasCustomData for truth: a string "false" would be true.
    given = {"ppsType": "Running", "hasCustomData": True, "count": 3, "ratio": 0.5, "gone": None, "name": "x"}
    vm = parse_vm(orjson.dumps({"instance": INSTANCE, "extended": {"compute": given}}), "t")
    assert vm.extended == {"compute": given}
    assert vm.extended["compute"]["hasCustomData"] is True
    # A key the file leaves out gets its default, a boolean too.
    vm = parse_vm(orjson.dumps({"instance": INSTANCE, "extended": {"compute": {"ppsType": "Savable"}}}), "t")
    assert vm.extended["compute"]["hasCustomData"] is False


def test_numbers_booleans_and_null_are_served_as_strings() -> None:
    compute = INSTANCE["compute"] | {"platformFaultDomain": 3, "osType": None, "zone": 1.5}
    compute["osProfile"] = compute["osProfile"] | {"disablePasswordAuthentication": True}
    vm = parse_vm(orjson.dumps({"instance": INSTANCE | {"compute": compute}}), "t")
    assert vm.instance["compute"]["platformFaultDomain"] == "3"
    assert vm.instance["compute"]["osType"] == ""
    assert vm.instance["compute"]["zone"] == "1.5"
    assert vm.instance["compute"]["osProfile"]["disablePasswordAuthentication"] == "true"


def test_a_null_extended_section_is_no_extended_section() -> None:
    # Regression (found by tests/fuzz/test_fuzz_admin.py): the validator let "extended": null
    # through as absent, then building the VM raised AttributeError (a 500 on the admin API).
    vm = parse_vm(orjson.dumps({"instance": INSTANCE, "extended": None}), "t")
    assert vm.extended == {"compute": {"ppsType": "None", "hasCustomData": False}}


def test_every_problem_is_listed_with_its_path() -> None:
    compute = INSTANCE["compute"] | {"tagsList": {"name": "x"}, "osProfile": "nope", "vmId": ["a"]}
    problems = problems_of({"instance": {"compute": compute}, "bogus": 1, "extended": []})
    assert "$.bogus: unknown top-level key" in problems[0]
    assert any(p.startswith("$.instance.network: required key is missing") for p in problems)
    assert "$.instance.compute.tagsList: expected an array, got an object" in problems
    assert "$.instance.compute.osProfile: expected an object, got a string" in problems
    assert "$.instance.compute.vmId: expected a string, number or boolean, got an array" in problems
    assert any(p.startswith("$.extended:") for p in problems)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ([], "$: expected an object with the key 'instance', got an array"),
        ({}, "$.instance: required key is missing"),
        ({"instance": "x"}, "$.instance: expected an object, got a string"),
        ({"instance": INSTANCE, "callers": "10.0.0.4"}, "$.callers: expected an array, got a string"),
        ({"instance": INSTANCE, "extended": {"compute": {"ppsType": {}}}}, "$.extended.compute.ppsType: expected a"),
    ],
)
def test_shape_problems(doc: Any, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems_of(doc))


@pytest.mark.parametrize(
    ("caller", "problem"),
    [
        ("10.0.0.4", None),
        ("fd00::4", None),
        ("fe80::1%2", None),
        ("not-an-ip", "is not an IPv4 or IPv6 address"),
        ("fe80::1", "is link-local: give its zone as the interface index"),
        ("fe80::1%eth0", "is link-local: give its zone as the interface index"),
    ],
)
def test_callers_are_addresses_and_link_local_ones_carry_their_link(caller: str, problem: str | None) -> None:
    document = {"instance": INSTANCE, "callers": [caller]}
    if problem is None:
        assert parse_vm(orjson.dumps(document), "test.json").reserved["callers"] == [caller]
    else:
        assert any(p.startswith(f"$.callers[0]: {caller!r} {problem}") for p in problems_of(document))


@pytest.mark.parametrize("key", ["", "a/b", "line\nbreak", "tab\there"])
def test_keys_no_path_or_listing_can_carry_are_refused(key: str) -> None:
    compute = INSTANCE["compute"] | {key: "v"}
    (problem,) = problems_of({"instance": INSTANCE | {"compute": compute}})
    assert problem.startswith("$.instance.compute: key")


def test_network_interface_elements_must_be_objects() -> None:
    network = {"interface": ["not an object"]}
    assert "$.instance.network.interface[0]: expected an object, got a string" in problems_of(
        {"instance": INSTANCE | {"network": network}}
    )


def test_nesting_is_capped() -> None:
    deep: Any = "leaf"
    for _ in range(MAX_NESTING_DEPTH + 5):
        deep = {"d": deep}
    problems = problems_of({"instance": INSTANCE | {"compute": INSTANCE["compute"] | {"deep": deep}}})
    assert any(f"nested deeper than {MAX_NESTING_DEPTH}" in p for p in problems)


def test_not_json_names_the_position() -> None:
    with pytest.raises(DataError) as caught:
        parse_vm(b'{"instance": {', "t")
    assert caught.value.problems[0].startswith("$: not valid JSON:")


def test_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (MAX_VM_FILE_BYTES + 10))
    with pytest.raises(DataError) as caught:
        load_vm(path)
    assert "over the" in caught.value.problems[0]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_vm(tmp_path / "missing.json")
    assert caught.value.problems == ["cannot read: No such file or directory"]
