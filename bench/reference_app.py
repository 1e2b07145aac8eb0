"""The minimal ASGI app the Python references (uvicorn, granian) run.

It answers exactly what fastimds answers for the benchmark's targets, from
pre-rendered bytes: a dict lookup on path and query, the Metadata header
check, and nothing else. It is the best case for "a Python user would pick
an ASGI server instead", not a second implementation of IMDS.

The replies are read from `BENCH_REPLIES` (a JSON file written by
bench.compare: {target: [status, content_type, body]}).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

_REPLIES: dict[bytes, tuple[int, list[tuple[bytes, bytes]], bytes]] = {}
with open(os.environ["BENCH_REPLIES"], "rb") as replies_file:
    _RAW = orjson.loads(replies_file.read())
for target, (status, content_type, body) in _RAW.items():
    encoded = body.encode()
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(encoded)).encode())]
    _REPLIES[target.encode()] = (status, headers, encoded)
_MISSING_HEADER = _REPLIES.pop(b"<missing-header>")
_NOT_FOUND = _REPLIES.pop(b"<not-found>")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    has_metadata = any(name == b"metadata" and value.lower() == b"true" for name, value in scope["headers"])
    if not has_metadata:
        status, headers, body = _MISSING_HEADER
    else:
        target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        status, headers, body = _REPLIES.get(target, _NOT_FOUND)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
