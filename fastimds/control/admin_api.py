"""The admin API: read and write VMs over a Unix socket or a loopback TCP port.

Rules of this module:
- Never served on the VM-facing listener: it has its own sockets, a Unix
  socket created with mode 0600 and an optional TCP port.
- On TCP every /vms, /scheduledevents, /faults and /metrics request (reads
  too: they show every VM's data, and /metrics names every VM id) needs
  `Authorization: Bearer <token>`, compared in constant time. The Unix
  socket relies on its file mode (0600: its owner only) instead. /healthz,
  /readyz and /jwks need nothing: they show no VM's data (/jwks is the
  public key). The connection (fastimds.control.admin_connection) asks
  `refusal` as soon as a request's head is complete, so a request without
  the token is refused before any of its body is read.
- Writes go through the control plane (fastimds.control.plane), which
  validates, numbers, persists and only then answers; every error is JSON
  naming the problem, and a refused write changes nothing.
- Routing is one table (`AdminApi.routes`: a path pattern and its methods). A path no
  route matches is 404; a method its route lacks is 405 with Allow listing
  the route's methods. Replies are built by the shared response builder
  (fastimds.imds.render.make_reply), so a reply's status is a field, never
  read back out of bytes.
- Not a hot path: plain code, one request at a time per connection. The
  HTTP framing, the connection caps and the deadlines are in
  fastimds.control.admin_connection.

Routes: GET /vms, GET|PUT|PATCH|DELETE /vms/{id}, GET /healthz, GET /readyz,
GET /metrics (Prometheus text), GET /jwks (the managed-identity token key).
Scheduled events (fastimds.imds.events): GET|POST /vms/{id}/scheduledevents,
DELETE /vms/{id}/scheduledevents/{EventId}, and for a group of VMs POST
/scheduledevents ({"vms": [...]} or {"vmScaleSetName": ...}, with
"subscriptionId" and "resourceGroupName" when the name is not unique, beside the event)
and DELETE /scheduledevents/{EventId}. Injected faults (fastimds.imds.faults):
GET|POST|DELETE /faults (POST: every VM, or "vms": [...] beside the fault),
DELETE /faults/{id}, POST|DELETE /vms/{id}/faults.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from fastimds.control.plane import ControlPlane
from fastimds.control.writer import UpdateError
from fastimds.imds.datafile import MAX_VM_FILE_BYTES
from fastimds.imds.keys import Keys
from fastimds.imds.render import CONNECTION_CLOSE, CONTENT_TYPE_JSON, Reply, make_reply
from fastimds.ops.telemetry import LAYOUT

MAX_ADMIN_BODY_BYTES = MAX_VM_FILE_BYTES + 64 * 1024  # a VM description plus JSON framing slack
MAX_ADMIN_HEAD_BYTES = 16 * 1024
CONTENT_TYPE_METRICS = b"text/plain; version=0.0.4; charset=utf-8"
# The first path segments whose routes need the bearer token on TCP (they show VM data;
# /metrics names every VM id in its per-VM series).
PROTECTED = frozenset({"vms", "scheduledevents", "faults", "metrics"})
# In a route's pattern: one path segment, as sent (a handler unquotes it if it means to).
PARAM = "{}"
# Last in a pattern: the rest of the path, one segment or more, "/" included (a VM id as sent).
REST = "{...}"


def json_reply(status: int, value: Any, extra_headers: bytes = b"", close: bool = False) -> Reply:
    return make_reply(status, orjson.dumps(value, option=orjson.OPT_SORT_KEYS), CONTENT_TYPE_JSON, extra_headers, close)


def wire(reply: Reply) -> bytes:
    """The bytes of a reply (the admin API sends no Date)."""
    return b"".join((reply.head, CONNECTION_CLOSE if reply.close else b"", b"\r\n", reply.body))


@dataclass(frozen=True)
class AdminRequest:
    method: str
    path: str  # without the query and any trailing "/"
    params: tuple[str, ...]  # what PARAM and REST matched, in order
    body: bytes


Handler = Callable[[AdminRequest], Reply]


@dataclass(frozen=True)
class Route:
    pattern: tuple[str, ...]  # path segments: literals, PARAM, or a last REST
    methods: dict[str, Handler]  # in the order Allow lists them

    def match(self, segments: list[str]) -> tuple[str, ...] | None:
        """The parameters, if `segments` fit this route's pattern."""
        rest = self.pattern[-1] == REST
        fixed = self.pattern[:-1] if rest else self.pattern
        if len(segments) < len(fixed) + rest or (not rest and len(segments) != len(fixed)):
            return None
        params = []
        for expected, segment in zip(fixed, segments, strict=False):
            if expected == PARAM:
                params.append(segment)
            elif expected != segment:
                return None
        if rest:
            params.append("/".join(segments[len(fixed) :]))
        return tuple(params)


def route(table: list[Route], segments: list[str]) -> tuple[Route, tuple[str, ...]] | None:
    """The first route of `table` that matches, with its parameters."""
    for candidate in table:
        params = candidate.match(segments)
        if params is not None:
            return candidate, params
    return None


class AdminApi:
    """What the admin listeners answer; shared by the Unix and TCP protocols.

    `metrics` renders the Prometheus exposition; `readiness` says whether
    every worker serves every configured VM (and why not); `counters` is the
    hosting process's telemetry list, where admin requests are counted.
    """

    def __init__(
        self,
        plane: ControlPlane,
        token: str | None,
        keys: Keys,
        *,
        metrics: Callable[[], bytes] | None = None,
        readiness: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
        counters: list[int] | None = None,
    ) -> None:
        self.plane = plane
        self.control = plane.control
        self.token = token
        self.keys = keys
        self.metrics = metrics
        self.readiness = readiness
        self.counters = counters
        read = ("GET", "HEAD")
        self.routes = [
            Route(("healthz",), dict.fromkeys(read, self._health)),
            Route(("readyz",), dict.fromkeys(read, self._ready)),
            Route(("jwks",), dict.fromkeys(read, self._jwks)),
            Route(("metrics",), dict.fromkeys(read, self._metrics)),
            Route(("vms",), {"GET": self._list_vms}),
            Route(("vms", PARAM, "scheduledevents"), {"GET": self._vm_events, "POST": self._add_vm_event}),
            Route(("vms", PARAM, "scheduledevents", PARAM), {"DELETE": self._cancel_vm_event}),
            Route(("vms", PARAM, "faults"), {"POST": self._add_vm_fault, "DELETE": self._remove_vm_faults}),
            Route(
                ("vms", REST),
                {"GET": self._get_vm, "PUT": self._put_vm, "PATCH": self._patch_vm, "DELETE": self._delete_vm},
            ),
            Route(("scheduledevents",), {"POST": self._add_group_event}),
            Route(("scheduledevents", PARAM), {"DELETE": self._cancel_event}),
            Route(("faults",), {"GET": self._list_faults, "POST": self._add_fault, "DELETE": self._remove_faults}),
            Route(("faults", PARAM), {"DELETE": self._remove_fault}),
        ]

    def handle(
        self,
        method: str,
        path: str,
        authorization: bytes | None,
        body: bytes,
        over_tcp: bool,
        *,
        token_checked: bool = False,
    ) -> bytes:
        """The counted reply's bytes; `token_checked` when the connection asked `refusal` at the head already."""
        return self.counted(self.answer(method, path, authorization, body, over_tcp, token_checked=token_checked))

    def counted(self, reply: Reply) -> bytes:
        """The bytes of `reply`, counted in the admin telemetry (requests by status, bytes)."""
        data = wire(reply)
        if self.counters is not None:
            self.counters[LAYOUT.request_slot("admin", reply.status)] += 1
            self.counters[LAYOUT.bytes_slot("admin")] += len(data)
        return data

    def refusal(self, path: str, authorization: bytes | None, over_tcp: bool) -> Reply | None:
        """The 401 for a request that needs the token and lacks it, else None: decided from the head alone."""
        segments = _segments(_route_path(path))
        if segments and segments[0] in PROTECTED and over_tcp and not self._authorized(authorization):
            return json_reply(
                401, {"error": "a bearer token is required"}, b'WWW-Authenticate: Bearer realm="fastimds"\r\n'
            )
        return None

    def answer(
        self,
        method: str,
        path: str,
        authorization: bytes | None,
        body: bytes,
        over_tcp: bool,
        *,
        token_checked: bool = False,
    ) -> Reply:
        refused = None if token_checked else self.refusal(path, authorization, over_tcp)
        if refused is not None:
            return refused
        path = _route_path(path)
        segments = _segments(path)
        found = route(self.routes, segments)
        if found is None:
            return json_reply(404, {"error": f"no admin route {path}"})
        chosen, params = found
        handler = chosen.methods.get(method)
        if handler is None:
            allow = ", ".join(chosen.methods).encode()
            return json_reply(405, {"error": f"{method} is not allowed on {path}"}, b"Allow: " + allow + b"\r\n")
        try:
            return handler(AdminRequest(method, path, params, body))
        except UpdateError as exc:
            error: dict[str, Any] = {"error": exc.message}
            if exc.problems:
                error["problems"] = exc.problems
            return json_reply(exc.status, error)

    def _authorized(self, authorization: bytes | None) -> bool:
        if self.token is None or authorization is None:
            return False
        scheme, _, credential = authorization.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token.encode())

    # ---- health, keys, telemetry ----

    def _health(self, _request: AdminRequest) -> Reply:
        return json_reply(200, {"status": "ok"})

    def _ready(self, _request: AdminRequest) -> Reply:
        ready, detail = self.readiness() if self.readiness else (True, {})
        detail = {"status": "ready" if ready else "not ready", "vms": len(self.control.live_ids()), **detail}
        return json_reply(200 if ready else 503, detail)

    def _jwks(self, _request: AdminRequest) -> Reply:
        # The public key of managed-identity tokens, for a test service to validate them.
        return json_reply(200, self.keys.issuer.jwks)

    def _metrics(self, _request: AdminRequest) -> Reply:
        if self.metrics is None:
            return json_reply(404, {"error": "telemetry is off (--no-telemetry)"})
        return make_reply(200, self.metrics(), CONTENT_TYPE_METRICS)

    # ---- VMs ----

    def _list_vms(self, _request: AdminRequest) -> Reply:
        return json_reply(200, {"vms": self.control.summary()})

    def _get_vm(self, request: AdminRequest) -> Reply:
        return json_reply(200, self.control.document(request.params[0]))

    def _put_vm(self, request: AdminRequest) -> Reply:
        vm_id = request.params[0]
        document = _json_body(request.body)
        existed = self.control.vm(vm_id) is not None
        generation = self.control.put(vm_id, document)
        return json_reply(200 if existed else 201, {"id": vm_id, "generation": generation})

    def _patch_vm(self, request: AdminRequest) -> Reply:
        vm_id = request.params[0]
        generation = self.control.patch(vm_id, _json_body(request.body))
        return json_reply(200, {"id": vm_id, "generation": generation})

    def _delete_vm(self, request: AdminRequest) -> Reply:
        vm_id = request.params[0]
        generation = self.control.delete(vm_id)
        return json_reply(200, {"id": vm_id, "deleted": True, "generation": generation})

    # ---- scheduled events ----

    def _vm_events(self, request: AdminRequest) -> Reply:
        vm_id = unquote(request.params[0])
        return json_reply(200, {"id": vm_id, **self.control.events_of(vm_id)})

    def _add_vm_event(self, request: AdminRequest) -> Reply:
        event_id, generations = self.plane.clock.add_event([unquote(request.params[0])], _json_body(request.body))
        return json_reply(201, {"EventId": event_id, "generations": generations})

    def _cancel_vm_event(self, request: AdminRequest) -> Reply:
        vm_id, event_id = (unquote(param) for param in request.params)
        return json_reply(200, {"EventId": event_id, "generations": self.plane.clock.cancel_event(event_id, vm_id)})

    def _add_group_event(self, request: AdminRequest) -> Reply:
        """One event on a group of VMs: named in "vms", or every VM of one scale set.

        A scale set is "vmScaleSetName", with "subscriptionId" and
        "resourceGroupName" when more than one scale set has that name
        (EventClock.vms_in_scale_set).
        """
        given = _json_body(request.body)
        if not isinstance(given, dict):
            raise UpdateError(400, "the body must be a JSON object: an event plus 'vms' or 'vmScaleSetName'")
        event = dict(given)
        vm_ids, scale_set = event.pop("vms", None), event.pop("vmScaleSetName", None)
        scope = {key: event.pop(key) for key in ("subscriptionId", "resourceGroupName") if key in event}
        if scope and scale_set is None:
            raise UpdateError(400, "'subscriptionId' and 'resourceGroupName' go with 'vmScaleSetName'")
        if not all(isinstance(value, str) for value in scope.values()):
            raise UpdateError(400, "'subscriptionId' and 'resourceGroupName' are strings")
        if scale_set is not None and vm_ids is None and isinstance(scale_set, str):
            vm_ids = self.plane.clock.vms_in_scale_set(
                scale_set, scope.get("subscriptionId"), scope.get("resourceGroupName")
            )
            if not vm_ids:
                raise UpdateError(404, f"no VM has vmScaleSetName {scale_set!r}" + (f" in {scope}" if scope else ""))
        elif not (scale_set is None and isinstance(vm_ids, list) and vm_ids):
            raise UpdateError(400, "give either 'vms' (a non-empty array of VM ids) or 'vmScaleSetName'")
        if not all(isinstance(vm_id, str) for vm_id in vm_ids):
            raise UpdateError(400, "'vms' must hold VM ids (strings)")
        event_id, generations = self.plane.clock.add_event(sorted(set(vm_ids)), event)
        return json_reply(201, {"EventId": event_id, "generations": generations})

    def _cancel_event(self, request: AdminRequest) -> Reply:
        event_id = unquote(request.params[0])
        return json_reply(200, {"EventId": event_id, "generations": self.plane.clock.cancel_event(event_id)})

    # ---- injected faults ----

    def _list_faults(self, _request: AdminRequest) -> Reply:
        return json_reply(200, {"faults": self.plane.faults.live()})

    def _add_fault(self, request: AdminRequest) -> Reply:
        given = _json_body(request.body)
        vm_ids = given.pop("vms", None) if isinstance(given, dict) else None
        if vm_ids is not None and not (
            isinstance(vm_ids, list) and vm_ids and all(isinstance(vm_id, str) for vm_id in vm_ids)
        ):
            raise UpdateError(400, "'vms' must be a non-empty array of VM ids (or absent: every VM)")
        return json_reply(201, self.plane.faults.add(given, sorted(set(vm_ids)) if vm_ids else None))

    def _remove_faults(self, _request: AdminRequest) -> Reply:
        return json_reply(200, {"removed": self.plane.faults.remove()})

    def _remove_fault(self, request: AdminRequest) -> Reply:
        return json_reply(200, {"removed": self.plane.faults.remove(fault_id=request.params[0])})

    def _add_vm_fault(self, request: AdminRequest) -> Reply:
        return json_reply(201, self.plane.faults.add(_json_body(request.body), [request.params[0]]))

    def _remove_vm_faults(self, request: AdminRequest) -> Reply:
        return json_reply(200, {"removed": self.plane.faults.remove(vm_id=request.params[0])})


def _route_path(target: str) -> str:
    """The request target without its query and any trailing "/"."""
    return target.split("?", 1)[0].rstrip("/") or "/"


def _segments(path: str) -> list[str]:
    # "*" and "http://..." are request targets too: no route has them.
    return path[1:].split("/") if path.startswith("/") else []


def _json_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise UpdateError(400, f"the body is not valid JSON: {exc}") from None
