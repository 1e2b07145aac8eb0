"""The admin API: AdminApi.handle and AdminProtocol without sockets.

Routes: GET /vms, GET|PUT|PATCH|DELETE /vms/{id}, GET /healthz, GET /readyz.
Over TCP every /vms request needs the bearer token; the Unix socket relies
on its file mode (0600). Every error is JSON naming the problem, and a
refused write changes nothing. The real socket's file mode is checked in
tests/e2e/test_admin_api_e2e.py.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastimds.control.admin_api import (
    MAX_ADMIN_BODY_BYTES,
    MAX_ADMIN_HEAD_BYTES,
    PARAM,
    REST,
    AdminApi,
    Route,
    route,
)
from fastimds.control.admin_connection import AdminProtocol
from fastimds.control.plane import ControlPlane
from fastimds.control.writer import Control
from fastimds.imds.datafile import MAX_VM_FILE_BYTES
from fastimds.imds.render import Reply
from tests.support.fakes import (
    FakeTransport,
    Response,
    admin_api,
    admin_connection,
    new_plane,
    serving,
    split_responses,
)
from tests.support.server_process import vm_document, vm_uuid

TOKEN = "s3cret-token-value"
JSON_TYPE = "application/json; charset=utf-8"


@pytest.fixture
def plane(tmp_path: Path) -> ControlPlane:
    return new_plane(tmp_path / "bus")


@pytest.fixture
def control(plane: ControlPlane) -> Control:
    return plane.control


@pytest.fixture
def api(plane: ControlPlane) -> AdminApi:
    return admin_api(plane, TOKEN)


def call(
    api: AdminApi,
    method: str,
    path: str,
    body: Any = None,
    *,
    tcp: bool = False,
    authorization: bytes | None = None,
) -> Response:
    """One request through AdminApi.handle; over TCP the right token is sent unless `authorization` says otherwise."""
    if tcp and authorization is None:
        authorization = f"Bearer {TOKEN}".encode()
    raw = body if isinstance(body, bytes) else (b"" if body is None else orjson.dumps(body))
    [response] = split_responses(api.handle(method, path, authorization, raw, tcp))
    assert response.headers["content-type"] == JSON_TYPE
    return response


def seeded(api: AdminApi) -> None:
    assert call(api, "PUT", "/vms/a", vm_document("a", callers=["10.1.0.4"])).status == 201
    assert call(api, "PUT", "/vms/b", vm_document("b", callers=["10.2.0.4"])).status == 201


# ---- health ----


@pytest.mark.parametrize("tcp", [False, True])
def test_healthz_and_readyz_need_no_token(api: AdminApi, tcp: bool) -> None:
    seeded(api)
    for authorization in (None, b"Bearer wrong"):
        for method in ("GET", "HEAD"):
            [health] = split_responses(api.handle(method, "/healthz", authorization, b"", tcp))
            assert (health.status, health.json()) == (200, {"status": "ok"})
        [ready] = split_responses(api.handle("GET", "/readyz", authorization, b"", tcp))
        assert (ready.status, ready.json()) == (200, {"status": "ready", "vms": 2})


@pytest.mark.parametrize("path", ["/", "/vm", "/vmsx", "/metadata/instance", "/healthzz"])
def test_unknown_routes_are_404(api: AdminApi, path: str) -> None:
    for tcp in (False, True):
        response = call(api, "GET", path, tcp=tcp, authorization=b"" if tcp else None)
        assert response.status == 404
        assert "no admin route" in response.json()["error"]


# ---- the route table ----


def test_a_path_the_table_lacks_is_404_json_whatever_the_method(api: AdminApi) -> None:
    seeded(api)
    # Each was answered otherwise by the old string-splitting router (405, or a VM lookup).
    for method, path in [("DELETE", "/faults/x/y"), ("POST", "/scheduledevents/E1/more"), ("GET", "/jwks/x")]:
        response = call(api, method, path)
        assert response.status == 404, path
        assert response.json() == {"error": f"no admin route {path}"}


def test_a_method_the_route_lacks_is_405_with_its_allow(api: AdminApi) -> None:
    seeded(api)
    checked = 0
    for candidate in api.routes:
        path = "/" + "/".join("a" if segment in (PARAM, REST) else segment for segment in candidate.pattern)
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            if method in candidate.methods:
                continue
            [response] = split_responses(api.handle(method, path, None, b"{}", False))
            assert response.status == 405, (method, path)
            assert response.headers["allow"] == ", ".join(candidate.methods), (method, path)
            assert response.json() == {"error": f"{method} is not allowed on {path}"}
            checked += 1
    assert checked > 50
    # The health routes answer reads only now: a POST was answered 200 before the table.
    assert call(api, "POST", "/healthz").headers["allow"] == "GET, HEAD"


def test_the_table_matches_literals_one_segment_params_and_a_rest() -> None:
    def nothing(_request: object) -> Reply:
        raise AssertionError

    table = [Route(("vms", PARAM, "faults"), {"POST": nothing}), Route(("vms", REST), {"GET": nothing})]
    assert route(table, ["vms", "a", "faults"]) == (table[0], ("a",))
    assert route(table, ["vms", "a", "b", "faults"]) == (table[1], ("a/b/faults",))  # an id as sent
    assert route(table, ["vms", "%2e"]) == (table[1], ("%2e",))
    assert route(table, ["vms"]) is None
    assert route(table, ["faults"]) is None


# ---- the token ----

PROTECTED = [
    ("GET", "/vms", None),
    ("GET", "/vms/a", None),
    ("PUT", "/vms/a", vm_document("a", callers=["10.1.0.9"], location="eastus")),
    ("PUT", "/vms/new", vm_document("new", callers=["10.5.0.4"])),
    ("PATCH", "/vms/a", {"instance": {"compute": {"location": "eastus"}}}),
    ("DELETE", "/vms/a", None),
    ("DELETE", "/vms/nope", None),
    ("POST", "/vms", None),
]

BAD_AUTHORIZATIONS = {
    "missing": None,
    "empty": b"",
    "wrong": b"Bearer not-the-token",
    "prefix": f"Bearer {TOKEN[:-1]}".encode(),
    "longer": f"Bearer {TOKEN}x".encode(),
    "other_scheme": f"Basic {TOKEN}".encode(),
    "no_scheme": TOKEN.encode(),
    "scheme_only": b"Bearer",
    "scheme_and_space": b"Bearer ",
}


@pytest.mark.parametrize("case", BAD_AUTHORIZATIONS)
def test_tcp_refuses_every_vms_request_without_the_right_token(api: AdminApi, control: Control, case: str) -> None:
    seeded(api)
    summary = serving(control).summary()
    for method, path, body in PROTECTED:
        raw = b"" if body is None else orjson.dumps(body)
        [response] = split_responses(api.handle(method, path, BAD_AUTHORIZATIONS[case], raw, True))
        assert response.status == 401, (method, path)
        assert response.headers["www-authenticate"] == 'Bearer realm="fastimds"'
        assert response.json() == {"error": "a bearer token is required"}
        assert TOKEN not in response.body.decode()
    assert serving(control).summary() == summary


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} "])
def test_tcp_accepts_the_right_token(api: AdminApi, authorization: str) -> None:
    seeded(api)
    response = call(api, "GET", "/vms", tcp=True, authorization=authorization.encode())
    assert response.status == 200
    assert [vm["id"] for vm in response.json()["vms"]] == ["a", "b"]
    assert call(api, "PUT", "/vms/c", vm_document("c"), tcp=True, authorization=authorization.encode()).status == 201


def test_the_token_is_compared_in_constant_time(api: AdminApi, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert call(api, "GET", "/vms", tcp=True, authorization=b"Bearer wrong").status == 401
    assert call(api, "GET", "/vms", tcp=True).status == 200
    assert compared == [(b"wrong", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_tcp_without_a_configured_token_refuses_everything(plane: ControlPlane) -> None:
    api = admin_api(plane, None)
    for authorization in (None, b"Bearer ", b"Bearer None", b"Bearer"):
        [response] = split_responses(api.handle("GET", "/vms", authorization, b"", True))
        assert response.status == 401


def test_the_unix_socket_needs_no_token(api: AdminApi) -> None:
    seeded(api)
    for authorization in (None, b"Bearer wrong"):
        [response] = split_responses(api.handle("GET", "/vms", authorization, b"", False))
        assert response.status == 200
    assert admin_api(api.plane, None).handle("GET", "/vms/a", None, b"", False).startswith(b"HTTP/1.1 200 ")


# ---- the routes ----


@pytest.mark.parametrize("tcp", [False, True])
def test_every_route(api: AdminApi, tcp: bool) -> None:
    document = vm_document("a", callers=["10.1.0.4"])
    created = call(api, "PUT", "/vms/a", document, tcp=tcp)
    assert (created.status, created.json()) == (201, {"id": "a", "generation": 1})
    assert created.body.startswith(b"{")  # a JSON object, and the status line says Created
    replaced = call(api, "PUT", "/vms/a", vm_document("a", callers=["10.1.0.4"], location="eastus"), tcp=tcp)
    assert (replaced.status, replaced.json()) == (200, {"id": "a", "generation": 2})
    patched = call(api, "PATCH", "/vms/a", {"instance": {"compute": {"location": "northeurope"}}}, tcp=tcp)
    assert (patched.status, patched.json()) == (200, {"id": "a", "generation": 3})
    call(api, "PUT", "/vms/b", vm_document("b", private_ips=["10.2.0.4", "FD00:2::4"]), tcp=tcp)

    got = call(api, "GET", "/vms/a", tcp=tcp)
    assert got.status == 200
    body = got.json()
    assert (body["id"], body["generation"], body["source"]) == ("a", 3, "admin")
    assert body["vm"]["instance"]["compute"]["location"] == "northeurope"
    assert body["vm"]["instance"]["compute"]["vmId"] == vm_uuid("a")
    assert body["vm"]["callers"] == ["10.1.0.4"]

    listed = call(api, "GET", "/vms", tcp=tcp)
    assert (listed.status, listed.json()) == (
        200,
        {
            "vms": [
                {"id": "a", "generation": 3, "callers": ["10.1.0.4"]},
                {"id": "b", "generation": 1, "callers": ["10.2.0.4", "fd00:2::4"]},
            ]
        },
    )
    for spelling in ("/vms/", "/vms?verbose=1", "/vms/?x"):
        assert call(api, "GET", spelling, tcp=tcp).json() == listed.json()
    assert call(api, "GET", "/vms/a/", tcp=tcp).json() == body

    deleted = call(api, "DELETE", "/vms/a", tcp=tcp)
    assert (deleted.status, deleted.json()) == (200, {"id": "a", "deleted": True, "generation": 4})
    for method in ("GET", "DELETE"):
        gone = call(api, method, "/vms/a", tcp=tcp)
        assert gone.status == 404
        assert "'a'" in gone.json()["error"]
    assert call(api, "PATCH", "/vms/a", {"instance": {}}, tcp=tcp).status == 404
    assert [vm["id"] for vm in call(api, "GET", "/vms", tcp=tcp).json()["vms"]] == ["b"]
    # Re-created after a delete: 201 again, and the generation keeps growing past the removal's.
    again = call(api, "PUT", "/vms/a", document, tcp=tcp)
    assert (again.status, again.json()) == (201, {"id": "a", "generation": 5})


def test_method_not_allowed(api: AdminApi) -> None:
    seeded(api)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = call(api, method, "/vms", {})
        assert response.status == 405
        assert response.headers["allow"] == "GET"
        assert method in response.json()["error"]
    for method in ("POST", "OPTIONS"):
        response = call(api, method, "/vms/a", {})
        assert response.status == 405
        assert response.headers["allow"] == "GET, PUT, PATCH, DELETE"


def _too_large() -> dict[str, Any]:
    document = vm_document("a", callers=["10.1.0.4"])
    document["instance"]["compute"]["tags"] = "x" * MAX_VM_FILE_BYTES
    return document


# (method, path, body) -> (status, text the error or a problem must contain)
REFUSED: dict[str, tuple[str, str, Any, int, str]] = {
    "put_not_json": ("PUT", "/vms/a", b"{not json", 400, "not valid JSON"),
    "put_empty_body": ("PUT", "/vms/a", b"", 400, "not valid JSON"),
    "patch_not_json": ("PATCH", "/vms/a", b"[1,", 400, "not valid JSON"),
    "put_schema": ("PUT", "/vms/a", {"instance": {"compute": {}}}, 400, "$.instance.network: required key is missing"),
    "put_unknown_key": ("PUT", "/vms/a", {**vm_document("a"), "extra": 1}, 400, "$.extra"),
    "patch_schema": ("PATCH", "/vms/a", {"instance": {"network": "flat"}}, 400, "$.instance.network"),
    "patch_null": ("PATCH", "/vms/a", b"null", 400, "expected an object"),
    "put_id_mismatch": ("PUT", "/vms/a", {**vm_document("a"), "id": "zzz"}, 400, "does not match"),
    "put_bad_id": ("PUT", "/vms/bad%20id", vm_document("x"), 400, "is not a VM id"),
    "put_traversal": ("PUT", "/vms/../etc", vm_document("x"), 400, "is not a VM id"),
    "put_conflict": ("PUT", "/vms/a", vm_document("a", private_ips=["10.2.0.4"]), 409, "10.2.0.4"),
    "put_conflict_new": ("PUT", "/vms/c", vm_document("c", callers=["10.1.0.4"]), 409, "10.1.0.4"),
    "patch_conflict": ("PATCH", "/vms/a", {"callers": ["10.2.0.4"]}, 409, "10.2.0.4"),
    "put_too_large": ("PUT", "/vms/a", _too_large(), 413, "1048576"),
    "patch_too_large": (
        "PATCH",
        "/vms/a",
        {"instance": {"compute": {"tags": "x" * MAX_VM_FILE_BYTES}}},
        413,
        "1048576",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_write_names_the_problem_and_changes_nothing(api: AdminApi, control: Control, case: str) -> None:
    method, path, body, status, needle = REFUSED[case]
    seeded(api)
    summary = serving(control).summary()
    documents = {vm_id: call(api, "GET", f"/vms/{vm_id}").json() for vm_id in ("a", "b")}
    bus_files = {path.name: path.read_bytes() for path in control.bus.directory.iterdir()}

    response = call(api, method, path, body)
    assert response.status == status
    error = response.json()
    texts = [error["error"], *error.get("problems", [])]
    assert any(needle in text for text in texts), error
    if status == 409:
        assert "'a'" in error["error"]
        assert ("'b'" in error["error"]) or ("'c'" in error["error"])

    assert serving(control).summary() == summary
    assert {vm_id: call(api, "GET", f"/vms/{vm_id}").json() for vm_id in ("a", "b")} == documents
    assert {path.name: path.read_bytes() for path in control.bus.directory.iterdir()} == bus_files
    assert call(api, "GET", "/vms/c").status == 404


def test_schema_errors_list_every_problem(api: AdminApi) -> None:
    document = vm_document("a")
    document["instance"]["compute"]["tagsList"] = "flat"
    document["callers"] = ["nope"]
    del document["instance"]["network"]
    response = call(api, "PUT", "/vms/a", document)
    assert response.status == 400
    error = response.json()
    assert error["error"] == "invalid VM description"
    assert set(error["problems"]) >= {
        "$.instance.network: required key is missing",
        "$.callers[0]: 'nope' is not an IPv4 or IPv6 address",
    }
    assert any(problem.startswith("$.instance.compute.tagsList") for problem in error["problems"])


# ---- AdminProtocol: HTTP framing, without sockets ----


def connection(api: AdminApi, tcp: bool = False) -> tuple[AdminProtocol, FakeTransport]:
    return admin_connection(api, tcp)


def http_request(method: str, target: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *headers]
    if body or method in ("PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_protocol_keep_alive_and_split_bodies(api: AdminApi) -> None:
    protocol, transport = connection(api)
    put = http_request("PUT", "/vms/a", orjson.dumps(vm_document("a", callers=["10.1.0.4"])))
    for index in range(0, len(put), 999):
        protocol.data_received(put[index : index + 999])
    protocol.data_received(http_request("GET", "/vms") + http_request("GET", "/healthz"))
    responses = split_responses(transport.output)
    assert [r.status for r in responses] == [201, 200, 200]
    assert responses[1].json()["vms"][0]["id"] == "a"
    assert not transport.ended
    protocol.data_received(http_request("GET", "/readyz", b"", "Connection: close"))
    assert transport.ended
    assert split_responses(transport.output)[-1].json() == {"status": "ready", "vms": 1}


def test_protocol_reads_the_authorization_header_over_tcp(api: AdminApi) -> None:
    for headers in ((), ("Authorization: Bearer wrong",)):
        protocol, transport = connection(api, tcp=True)
        protocol.data_received(http_request("GET", "/vms", b"", *headers))
        [refused] = split_responses(transport.output)
        assert (refused.status, refused.headers["connection"]) == (401, "close")  # and the connection ends
        assert transport.ended
    protocol, transport = connection(api, tcp=True)
    protocol.data_received(http_request("GET", "/vms", b"", f"authorization: Bearer {TOKEN}"))
    protocol.data_received(http_request("GET", "/vms"))  # the header is per request, not per connection
    assert [r.status for r in split_responses(transport.output)] == [200, 401]
    assert transport.ended


def test_protocol_refuses_a_body_over_the_limit(api: AdminApi, control: Control) -> None:
    protocol, transport = connection(api)
    body = b'{"instance": "' + b"x" * MAX_ADMIN_BODY_BYTES + b'"}'
    protocol.data_received(http_request("PUT", "/vms/a", body))
    [response] = split_responses(transport.output)
    assert response.status == 413
    assert response.headers["connection"] == "close"
    assert str(MAX_ADMIN_BODY_BYTES) in response.json()["error"]
    assert transport.ended
    assert serving(control).live() == {}


def test_protocol_refuses_a_head_over_the_limit(api: AdminApi) -> None:
    protocol, transport = connection(api)
    protocol.data_received(http_request("GET", "/vms", b"", f"X-Filler: {'y' * MAX_ADMIN_HEAD_BYTES}"))
    [response] = split_responses(transport.output)
    assert response.status == 431
    assert transport.ended


def test_protocol_answers_garbage_with_400_and_closes(api: AdminApi) -> None:
    protocol, transport = connection(api)
    protocol.data_received(b"\x00\x01 not http\r\n\r\n")
    [response] = split_responses(transport.output)
    assert response.status == 400
    assert "malformed" in response.json()["error"]
    assert transport.ended


def test_protocol_turns_an_internal_error_into_500(
    api: AdminApi, control: Control, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_vm_id: str) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(control, "document", broken)
    protocol, transport = connection(api)
    protocol.data_received(http_request("GET", "/vms/a") + http_request("GET", "/healthz"))
    responses = split_responses(transport.output)
    assert [r.status for r in responses] == [500, 200]
    assert "boom" in responses[0].json()["error"]
