"""A connected etcd client from EtcdSettings: endpoints, TLS and login in one place.

Rules of this module:
- The client library is etcd3aio (an optional extra: `pip install
  'fastimds[etcd]'`; docs/architecture.md says why it over aetcd). It is
  imported only here, and only when fleet mode or `fastimds fleet` runs, so
  the embedded default needs none of gRPC.
- One channel over every endpoint, balanced round-robin by gRPC: a member
  that is down fails its calls over to the others (the library retries a
  call that found a member unavailable).
- TLS files are read when the client is made; a file that cannot be read
  is an EtcdSetupError naming it. The password comes from its file, read
  by the command line (fastimds.cli.main), never from a flag.
- Errors a caller can act on are EtcdSetupError (the extra missing, a TLS
  file unreadable) and the library's EtcdError family (unreachable, refused
  login, permission). `describe_error` turns them into one line.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastimds.config import ETCD_REQUEST_TIMEOUT_S, EtcdSettings
from fastimds.sources.etcd_layout import prefix_end

if TYPE_CHECKING:
    from etcd3aio import Etcd3Client
    from etcd3aio.kv import KVService

# gRPC's core logs a failed TLS handshake or connection on stderr itself, several lines each, among
# the event log's JSON lines; the source logs every failure as one event. Read when gRPC loads.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

EXTRA_MISSING = "fleet mode needs the etcd client: pip install 'fastimds[etcd]' (etcd3aio)"


class EtcdSetupError(Exception):
    """The client cannot be made at all (no library, an unreadable TLS file): no retry helps."""


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise EtcdSetupError(f"cannot read {what} {path}: {exc.strerror}") from None


@dataclass
class EtcdConnection:
    """One channel to the cluster: the library's client, and the watch stream this project drives itself."""

    client: Etcd3Client
    token: str | None

    @property
    def kv(self) -> KVService:
        assert self.client.kv is not None
        return self.client.kv

    async def watch(self, key: bytes, range_end: bytes, start_revision: int) -> AsyncIterator[Any]:
        """The raw watch stream from `start_revision`: every reply, and an error when the stream breaks.

        Not the library's watch: after a broken stream it resumes at the last reply's header revision,
        which skips the events still to come of a watch catching up from an older revision. A stream
        that breaks here ends the session instead, and the source resumes after the last event it
        applied. It runs on the library's channel with the library's generated stub.
        """
        from etcd.api.etcdserverpb import rpc_pb2, rpc_pb2_grpc  # type: ignore[import-not-found]  # etcd3aio's

        create = rpc_pb2.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision)

        async def requests() -> AsyncIterator[Any]:
            yield rpc_pb2.WatchRequest(create_request=create)
            await asyncio.Future()  # the request side stays open for as long as the watch runs

        # hasleader: a member cut off from the cluster's leader ends the stream (etcd's "require
        # leader"), so a partitioned member cannot hold a watch that will never see another event.
        metadata = [("hasleader", "true")] + ([("token", self.token)] if self.token else [])
        call = rpc_pb2_grpc.WatchStub(self.client._channel).Watch(requests(), metadata=metadata)
        try:
            async for reply in call:
                yield reply
        finally:
            call.cancel()

    async def pages(
        self, prefix: bytes, *, page_keys: int, keys_only: bool = False, revision: int = 0
    ) -> AsyncIterator[tuple[int, Any]]:
        """(R, key-values) per page of every key under `prefix`, all at one revision R (the first page's,
        unless `revision` is given). A page over gRPC's 4 MiB message limit is read again at half the size."""
        start, end, page = prefix, prefix_end(prefix), page_keys
        while True:
            try:
                reply = await self.kv.get(
                    start, end, revision=revision, limit=page, keys_only=keys_only, timeout=ETCD_REQUEST_TIMEOUT_S
                )
            except Exception as exc:
                if "RESOURCE_EXHAUSTED" in describe_error(exc) and page > 1:
                    page //= 2  # the same keys, fewer at a time
                    continue
                raise
            revision = revision or reply.header.revision
            yield revision, reply.kvs
            if not reply.more or not reply.kvs:
                return
            start = bytes(reply.kvs[-1].key) + b"\x00"  # the next key after the page's last

    async def close(self) -> None:
        await self.client.close()


async def connect(settings: EtcdSettings) -> EtcdConnection:
    """A client with its channel open and, with a user, logged in (EtcdError when etcd refuses or is away)."""
    try:
        from etcd3aio import Etcd3Client
    except ImportError:
        raise EtcdSetupError(EXTRA_MISSING) from None
    ca, cert, key = (
        (
            _read(settings.ca_file, "--etcd-ca"),
            _read(settings.cert_file, "--etcd-cert"),
            _read(settings.key_file, "--etcd-key"),
        )
        if settings.tls
        else (None, None, None)
    )
    # One round-robin channel checks every member's certificate against one name: --etcd-server-name,
    # else the first endpoint's host. Members whose certificates name only themselves need a shared
    # name in every certificate (a DNS name, or all the members' IPs), given as --etcd-server-name.
    server_name = (settings.server_name or settings.addresses[0].rpartition(":")[0]) if settings.tls else None
    client = Etcd3Client(
        list(settings.addresses), tls_server_name=server_name, ca_cert=ca, cert_chain=cert, cert_key=key
    )
    # gRPC shares each member's connection, and its reconnect backoff, between every channel of a
    # process: after a 30 s outage a new channel still waited out the old backoff (hosts reconnected
    # 5.6-13.9 s after etcd's return in the fleet simulation; with a private pool, within 1.3 s:
    # tuning.md). etcd3aio takes no channel options, so its list is extended before the channel exists.
    client._manager.grpc_options.append(("grpc.use_local_subchannel_pool", 1))
    await client.connect()
    token: str | None = None
    if settings.user is not None and settings.password is not None:
        try:
            assert client.auth is not None
            reply = await client.auth.authenticate(settings.user, settings.password, timeout=ETCD_REQUEST_TIMEOUT_S)
        except BaseException:
            await client.close()
            raise
        token = reply.token
        client.set_token(token)
    return EtcdConnection(client, token)


def describe_error(exc: BaseException) -> str:
    """One line for a failed etcd call: what the library or gRPC said, without a traceback."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):  # a gRPC error (grpc.aio.AioRpcError), gRPC imported lazily
        return f"{code().name}: {details() or ''}".rstrip(": ")
    if isinstance(exc, TimeoutError):
        return f"no answer within {ETCD_REQUEST_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__
