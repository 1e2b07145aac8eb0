"""The admin API: read and write VMs over a Unix socket or a loopback TCP port.

Rules of this module:
- Never served on the VM-facing listener: it has its own sockets, a Unix
  socket created with mode 0600 and an optional TCP port.
- On TCP every /vms request (reads too: they show every VM's data) needs
  `Authorization: Bearer <token>`, compared in constant time. The Unix
  socket relies on its file mode instead. /healthz, /readyz and /metrics
  need nothing: they show no VM's data.
- Writes go through `Control`, which validates, numbers, persists and only
  then answers; every error is JSON naming the problem, and a refused write
  changes nothing.
- Not a hot path: plain code, one request at a time per connection.

Routes: GET /vms, GET|PUT|PATCH|DELETE /vms/{id}, GET /healthz, GET /readyz,
GET /metrics (Prometheus text), GET /jwks (the managed-identity token key); like
/healthz and /readyz they need no token. Scheduled events (fastimds.imds.events):
GET|POST /vms/{id}/scheduledevents, DELETE /vms/{id}/scheduledevents/{EventId},
and for a group of VMs POST /scheduledevents ({"vms": [...]} or
{"vmScaleSetName": ...} beside the event) and DELETE /scheduledevents/{EventId}.
Injected faults (fastimds.imds.faults): GET|POST|DELETE /faults (POST: every VM, or
"vms": [...] beside the fault), DELETE /faults/{id}, POST|DELETE /vms/{id}/faults.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

import httptools
import orjson

from fastimds.control.writer import Control, UpdateError
from fastimds.imds.datafile import MAX_VM_FILE_BYTES
from fastimds.imds.keys import Keys
from fastimds.imds.render import STATUS_LINES
from fastimds.ops.telemetry import LAYOUT

MAX_ADMIN_BODY_BYTES = MAX_VM_FILE_BYTES + 64 * 1024  # a VM description plus JSON framing slack
MAX_ADMIN_HEAD_BYTES = 16 * 1024

_STATUS_REASONS = {201: "Created", 401: "Unauthorized", 409: "Conflict", 415: "Unsupported Media Type"}


def _status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} {_STATUS_REASONS.get(status, 'Error')}\r\n".encode()


def json_response(status: int, value: Any, extra_headers: bytes = b"", close: bool = False) -> bytes:
    body = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return b"".join(
        (
            _status_line(status),
            b"Content-Type: application/json; charset=utf-8\r\n",
            b"Content-Length: ",
            str(len(body)).encode(),
            b"\r\n",
            extra_headers,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


class AdminApi:
    """What the admin listeners answer; shared by the Unix and TCP protocols.

    `metrics` renders the Prometheus exposition; `readiness` says whether
    every worker serves every configured VM (and why not); `counters` is the
    hosting process's telemetry list, where admin requests are counted.
    """

    def __init__(
        self,
        control: Control,
        token: str | None,
        *,
        metrics: Callable[[], bytes] | None = None,
        readiness: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
        counters: list[int] | None = None,
        keys: Keys | None = None,
    ) -> None:
        self.control = control
        self.keys = keys if keys is not None else Keys()  # the server's, for /jwks (made on first use if none)
        self.token = token
        self.metrics = metrics
        self.readiness = readiness
        self.counters = counters

    def handle(self, method: str, path: str, authorization: bytes | None, body: bytes, over_tcp: bool) -> bytes:
        reply = self._handle(method, path, authorization, body, over_tcp)
        if self.counters is not None:
            status = int(reply[9:12])
            self.counters[LAYOUT.request_slot("admin", status)] += 1
            self.counters[LAYOUT.bytes_slot("admin")] += len(reply)
        return reply

    def _handle(self, method: str, path: str, authorization: bytes | None, body: bytes, over_tcp: bool) -> bytes:
        path = path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        if path == "/readyz":
            ready, detail = self.readiness() if self.readiness else (True, {})
            detail = {"status": "ready" if ready else "not ready", "vms": len(self.control.registry.live()), **detail}
            return json_response(200 if ready else 503, detail)
        if path == "/jwks":
            # The public key of managed-identity tokens, for a test service to validate them.
            return json_response(200, self.keys.issuer.jwks)
        if path == "/metrics":
            if self.metrics is None:
                return json_response(404, {"error": "telemetry is off (--no-telemetry)"})
            body = self.metrics()
            return b"".join(
                (
                    _status_line(200),
                    b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n",
                    b"Content-Length: ",
                    str(len(body)).encode(),
                    b"\r\n\r\n",
                    body,
                )
            )
        resource = path.split("/")[1] if path.startswith("/") else ""  # "*" and "http://..." are targets too
        if resource not in ("vms", "scheduledevents", "faults"):
            return json_response(404, {"error": f"no admin route {path}"})
        if over_tcp and not self._authorized(authorization):
            return json_response(
                401, {"error": "a bearer token is required"}, b'WWW-Authenticate: Bearer realm="fastimds"\r\n'
            )
        try:
            if resource == "scheduledevents":
                return self._group_events(method, path, body)
            if resource == "faults":
                return self._faults(method, path, body)
            if path.count("/") >= 3 and path.split("/")[3] == "scheduledevents":
                return self._vm_events(method, path, body)
            if path.count("/") == 3 and path.split("/")[3] == "faults":
                return self._vm_faults(method, path, body)
            return self._vms(method, path, body)
        except UpdateError as exc:
            error: dict[str, Any] = {"error": exc.message}
            if exc.problems:
                error["problems"] = exc.problems
            return json_response(exc.status, error)

    def _authorized(self, authorization: bytes | None) -> bool:
        if self.token is None or authorization is None:
            return False
        scheme, _, credential = authorization.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token.encode())

    def _vm_events(self, method: str, path: str, body: bytes) -> bytes:
        """/vms/{id}/scheduledevents[/{EventId}]."""
        parts = [unquote(part) for part in path.split("/")]  # "", "vms", id, "scheduledevents"[, EventId]
        vm_id = parts[2]
        if len(parts) == 4 and method == "GET":
            return json_response(200, {"id": vm_id, **self.control.events_of(vm_id)})
        if len(parts) == 4 and method == "POST":
            event_id, generations = self.control.add_event([vm_id], _json_body(body))
            return json_response(201, {"EventId": event_id, "generations": generations})
        if len(parts) == 5 and method == "DELETE":
            return json_response(200, {"EventId": parts[4], "generations": self.control.cancel_event(parts[4], vm_id)})
        allow = b"GET, POST" if len(parts) == 4 else b"DELETE"
        return json_response(405, {"error": f"{method} is not allowed on {path}"}, b"Allow: " + allow + b"\r\n")

    def _group_events(self, method: str, path: str, body: bytes) -> bytes:
        """/scheduledevents (POST: one event on a group of VMs) and /scheduledevents/{EventId} (DELETE)."""
        parts = [unquote(part) for part in path.split("/")]  # "", "scheduledevents"[, EventId]
        if len(parts) == 2 and method == "POST":
            request = _json_body(body)
            if not isinstance(request, dict):
                raise UpdateError(400, "the body must be a JSON object: an event plus 'vms' or 'vmScaleSetName'")
            event = dict(request)
            vm_ids, scale_set = event.pop("vms", None), event.pop("vmScaleSetName", None)
            if scale_set is not None and vm_ids is None and isinstance(scale_set, str):
                vm_ids = self.control.vms_in_scale_set(scale_set)
                if not vm_ids:
                    raise UpdateError(404, f"no VM has vmScaleSetName {scale_set!r}")
            elif not (scale_set is None and isinstance(vm_ids, list) and vm_ids):
                raise UpdateError(400, "give either 'vms' (a non-empty array of VM ids) or 'vmScaleSetName'")
            if not all(isinstance(vm_id, str) for vm_id in vm_ids):
                raise UpdateError(400, "'vms' must hold VM ids (strings)")
            event_id, generations = self.control.add_event(sorted(set(vm_ids)), event)
            return json_response(201, {"EventId": event_id, "generations": generations})
        if len(parts) == 3 and method == "DELETE":
            return json_response(200, {"EventId": parts[2], "generations": self.control.cancel_event(parts[2])})
        allow = b"POST" if len(parts) == 2 else b"DELETE"
        return json_response(405, {"error": f"{method} is not allowed on {path}"}, b"Allow: " + allow + b"\r\n")

    def _faults(self, method: str, path: str, body: bytes) -> bytes:
        """/faults (GET, POST, DELETE all) and /faults/{id} (DELETE)."""
        parts = path.split("/")  # "", "faults"[, id]
        if len(parts) == 2 and method == "GET":
            return json_response(200, {"faults": self.control.live_faults()})
        if len(parts) == 2 and method == "POST":
            request = _json_body(body)
            vm_ids = request.pop("vms", None) if isinstance(request, dict) else None
            if vm_ids is not None and not (
                isinstance(vm_ids, list) and vm_ids and all(isinstance(vm_id, str) for vm_id in vm_ids)
            ):
                raise UpdateError(400, "'vms' must be a non-empty array of VM ids (or absent: every VM)")
            return json_response(201, self.control.add_fault(request, sorted(set(vm_ids)) if vm_ids else None))
        if method == "DELETE" and len(parts) in (2, 3):
            removed = self.control.remove_faults(fault_id=parts[2] if len(parts) == 3 else None)
            return json_response(200, {"removed": removed})
        allow = b"GET, POST, DELETE" if len(parts) == 2 else b"DELETE"
        return json_response(405, {"error": f"{method} is not allowed on {path}"}, b"Allow: " + allow + b"\r\n")

    def _vm_faults(self, method: str, path: str, body: bytes) -> bytes:
        """/vms/{id}/faults: POST one for this VM; DELETE this VM's own."""
        vm_id = path.split("/")[2]
        if method == "POST":
            return json_response(201, self.control.add_fault(_json_body(body), [vm_id]))
        if method == "DELETE":
            return json_response(200, {"removed": self.control.remove_faults(vm_id=vm_id)})
        return json_response(405, {"error": f"{method} is not allowed on {path}"}, b"Allow: POST, DELETE\r\n")

    def _vms(self, method: str, path: str, body: bytes) -> bytes:
        control = self.control
        if path == "/vms":
            if method != "GET":
                return json_response(405, {"error": f"{method} is not allowed on /vms"}, b"Allow: GET\r\n")
            return json_response(200, {"vms": control.registry.summary()})
        vm_id = path[len("/vms/") :]
        if method == "GET":
            return json_response(200, control.document(vm_id))
        if method == "DELETE":
            generation = control.delete(vm_id)
            return json_response(200, {"id": vm_id, "deleted": True, "generation": generation})
        if method in ("PUT", "PATCH"):
            document = _json_body(body)
            existed = vm_id in control.registry.live()
            generation = control.put(vm_id, document) if method == "PUT" else control.patch(vm_id, document)
            return json_response(
                201 if method == "PUT" and not existed else 200, {"id": vm_id, "generation": generation}
            )
        return json_response(
            405, {"error": f"{method} is not allowed on /vms/{{id}}"}, b"Allow: GET, PUT, PATCH, DELETE\r\n"
        )


def _json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpdateError(400, f"the body is not valid JSON: {exc}") from None


class AdminProtocol(asyncio.Protocol):
    def __init__(self, api: AdminApi, over_tcp: bool) -> None:
        self.api = api
        self.over_tcp = over_tcp
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.authorization: bytes | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.head_size = 0
        self.failure: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.transport.close()  # Upgrade or CONNECT: answered (on_message_complete); we speak nothing else
        except httptools.HttpParserError:
            reply = self.failure or json_response(400, {"error": "malformed HTTP request"}, close=True)
            self.transport.write(reply)
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        if name.lower() == b"authorization":
            self.authorization = value

    def _count(self, size: int) -> None:
        self.head_size += size
        if self.head_size > MAX_ADMIN_HEAD_BYTES:
            self.failure = json_response(431, {"error": "request head too large"}, close=True)
            raise ValueError("head too large")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        if self.body_size > MAX_ADMIN_BODY_BYTES:
            self.failure = json_response(413, {"error": f"body over {MAX_ADMIN_BODY_BYTES} bytes"}, close=True)
            raise ValueError("body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        method = self.parser.get_method().decode("latin-1")
        try:
            reply = self.api.handle(
                method, self.url.decode("latin-1"), self.authorization, b"".join(self.body), self.over_tcp
            )
        except Exception as exc:  # an admin bug must not take the listener down
            reply = json_response(500, {"error": f"internal error: {exc!r}"})
        self.transport.write(reply)
        if not self.parser.should_keep_alive():
            self.transport.close()
        self._reset()


def admin_factory(api: AdminApi, over_tcp: bool) -> Callable[[], AdminProtocol]:
    return lambda: AdminProtocol(api, over_tcp)
