"""The request log: records on disk, rotation, retention, and failures that never reach the server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastimds.cli.logs import parse_line
from fastimds.ops.request_log import MAX_BUFFERED_RECORDS, MAX_BUFFERED_VALUES, RequestLog, rotated_files
from fastimds.ops.request_log_format import (
    FIELDS,
    HEADER,
    UNLIMITED_FILES,
    format_stamp,
    parse_retention,
    parse_stamp,
)

T0 = 1_795_000_000.0  # a pinned clock: 2026-11-18T11:06:40Z
TARGET = "/metadata/instance?api-version=2021-02-01"


def record(log: RequestLog, ts: float = T0, **overrides: Any) -> None:
    fields: dict[str, Any] = {
        "caller": "10.0.0.4",
        "vm_id": "vm-1",
        "method": "GET",
        "target": TARGET,
        "status": 200,
        "size": 1834,
        "latency_us": 123,
        "generation": 7,
    } | overrides
    log.record(ts, **fields)


def lines_of(path: Path) -> list[dict[str, Any]]:
    """The records of a file, read as `fastimds logs` reads them (header lines name the array fields)."""
    records: list[dict[str, Any]] = []
    fields: list[str] | None = None
    for line in path.read_bytes().splitlines():
        parsed = parse_line(line, fields)
        if isinstance(parsed, list):
            fields = parsed
            continue
        assert parsed is not None, f"not a record: {line!r}"
        records.append(parsed)
    return records


def lines_of_after_header(lines: list[bytes]) -> list[dict[str, Any]]:
    fields = parse_line(lines[0], None)
    assert isinstance(fields, list)
    return [record for line in lines[1:] if isinstance(record := parse_line(line, fields), dict)]


def names(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def test_records_are_json_lines_with_the_documented_keys(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=3)
    record(log)
    log.record(T0 + 0.5, b"10.0.0.5", "", b"HEAD", b"/metadata/versions?x=\xff", 404, 0, 9, 0)
    assert names(tmp_path) == []  # nothing is written before a flush
    log.flush(T0 + 1)
    assert names(tmp_path) == ["requests.w003.jsonl"]
    raw = (tmp_path / "requests.w003.jsonl").read_bytes()
    assert raw.count(b"\n") == 3 and raw.endswith(b"\n")  # the header, then one line per record
    assert raw.startswith(HEADER)
    first, second = lines_of(tmp_path / "requests.w003.jsonl")
    assert list(first) == ["ts", "caller", "vm", "method", "target", "status", "bytes", "latency_us", "generation"]
    assert first == {
        "ts": T0,
        "caller": "10.0.0.4",
        "vm": "vm-1",
        "method": "GET",
        "target": TARGET,
        "status": 200,
        "bytes": 1834,
        "latency_us": 123,
        "generation": 7,
    }
    # bytes are decoded at flush time; invalid UTF-8 is kept visible, not lost
    assert second["caller"] == "10.0.0.5" and second["method"] == "HEAD"
    assert second["target"] == "/metadata/versions?x=\\xff"
    assert (log.written, log.dropped, log.lost, log.errors) == (2, 0, 0, 0)
    log.close(T0 + 2)


def test_a_target_that_looks_like_a_record_boundary_stays_in_its_line(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0)
    sneaky = '/metadata/instance?a=},{"ts":1,"caller":"x"}\n{"ts":2}'
    record(log, target=sneaky)
    record(log, target="/after")
    log.flush(T0 + 1)
    lines = lines_of(tmp_path / "requests.w000.jsonl")
    assert [line["target"] for line in lines] == [sneaky, "/after"]
    log.close(T0 + 1)


def test_flushes_append_to_one_open_file(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0)
    current = tmp_path / "requests.w000.jsonl"
    for second in range(3):
        record(log, ts=T0 + second, status=200 + second)
        log.flush(T0 + second + 0.5)
    assert [line["status"] for line in lines_of(current)] == [200, 201, 202]
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str(current.resolve()) in open_files  # kept open between flushes
    log.close(T0 + 4)
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert str(current.resolve()) not in open_files


def test_a_large_buffer_is_written_in_slices_oldest_first(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0)
    current = tmp_path / "requests.w000.jsonl"
    for index in range(25):
        record(log, ts=T0 + index)
    written = []
    for _ in range(3):
        log.flush(T0 + 30, max_records=10)
        written.append((len(lines_of(current)), log.buffered))
    assert written == [(10, 15), (20, 5), (25, 0)]
    assert [line["ts"] for line in lines_of(current)] == [T0 + index for index in range(25)]
    log.close(T0 + 31)


def test_an_empty_flush_creates_no_file(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0)
    log.flush(T0)
    log.close(T0 + 1)
    assert names(tmp_path) == []


def test_rotation_by_size(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=1, max_file_bytes=800)
    for index in range(4):  # a 118-byte header and 98 bytes each: under the limit
        record(log, ts=T0 + index)
    log.flush(T0 + 10)
    assert names(tmp_path) == ["requests.w001.jsonl"]
    for index in range(4):  # now over it: this flush's write lands, then the file is rotated
        record(log, ts=T0 + 10 + index)
    log.flush(T0 + 20)
    rotated_name = f"requests.{format_stamp(int((T0 + 20) * 1e6))}.w001.jsonl"
    assert names(tmp_path) == [rotated_name]
    assert len(lines_of(tmp_path / rotated_name)) == 8
    record(log, ts=T0 + 21)
    log.flush(T0 + 22)
    assert names(tmp_path) == [rotated_name, "requests.w001.jsonl"]
    assert [line["ts"] for line in lines_of(tmp_path / "requests.w001.jsonl")] == [T0 + 21]
    assert log.rotations == 1
    log.close(T0 + 23)


def test_rotation_by_age_even_without_new_records(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0, max_file_age_s=60)
    record(log, ts=T0)
    log.flush(T0)
    log.flush(T0 + 59.9)
    assert names(tmp_path) == ["requests.w000.jsonl"]
    log.flush(T0 + 60)  # an idle worker still closes an old file
    [(stamp_us, path)] = rotated_files(tmp_path)
    assert stamp_us == int((T0 + 60) * 1e6)
    assert path.name == "requests.20261118T110740.000000Z.w000.jsonl"
    assert names(tmp_path) == [path.name]  # the next current file is made by the next record
    log.close(T0 + 61)


def test_rotated_names_sort_by_time_and_never_repeat(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0, max_file_bytes=1, retain_files=100)
    for index in range(3):  # three rotations at one pinned instant
        record(log, ts=T0, status=200 + index)
        log.flush(T0)
    found = sorted(rotated_files(tmp_path))
    assert [stamp for stamp, _ in found] == [int(T0 * 1e6), int(T0 * 1e6) + 1, int(T0 * 1e6) + 2]
    assert sorted(path.name for _, path in found) == [path.name for _, path in found]
    assert [lines_of(path)[0]["status"] for _, path in found] == [200, 201, 202]
    # a restarted worker continues after its predecessor's names, even with a clock that went back
    again = RequestLog(tmp_path, worker=0, max_file_bytes=1, retain_files=100)
    record(again, ts=T0 - 100, status=299)
    again.flush(T0 - 100)
    newest_stamp, newest = max(rotated_files(tmp_path))
    assert newest_stamp == int(T0 * 1e6) + 3 and lines_of(newest)[0]["status"] == 299
    log.close(T0)
    again.close(T0)


def test_retention_by_count_keeps_the_newest_of_its_own_worker(tmp_path: Path) -> None:
    other = tmp_path / "requests.20200101T000000.000000Z.w009.jsonl"  # another worker's, ancient
    other.write_bytes(b"")
    stranger = tmp_path / "notes.txt"
    stranger.write_bytes(b"keep me")
    log = RequestLog(tmp_path, worker=0, max_file_bytes=1, retain_files=3)
    for index in range(6):
        record(log, ts=T0 + index, status=200 + index)
        log.flush(T0 + index)
    mine = sorted(rotated_files(tmp_path, worker=0))
    assert [lines_of(path)[0]["status"] for _, path in mine] == [203, 204, 205]
    assert other.exists() and stranger.exists()
    log.close(T0 + 10)


def test_retention_by_age(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=2, max_file_bytes=1, retain_files=UNLIMITED_FILES, retain_age_s=3600)
    for hour in range(5):
        record(log, ts=T0 + hour * 3600, status=200 + hour)
        log.flush(T0 + hour * 3600)
    # at the last flush, files closed more than an hour earlier were deleted
    kept = sorted(rotated_files(tmp_path))
    assert [lines_of(path)[0]["status"] for _, path in kept] == [203, 204]
    # age is enforced on idle workers too, at least once a minute
    log.flush(T0 + 4 * 3600 + 3599)
    assert len(rotated_files(tmp_path)) == 1
    log.flush(T0 + 5 * 3600 + 60)
    assert rotated_files(tmp_path) == []
    log.close(T0 + 6 * 3600)


def test_retention_keeps_none_with_zero_files(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0, max_file_bytes=1, retain_files=0)
    record(log)
    log.flush(T0)
    assert names(tmp_path) == []
    record(log)
    log.flush(T0 + 1)
    assert names(tmp_path) == []
    assert log.rotations == 2 and log.written == 2 and log.errors == 0


def test_workers_share_a_directory_without_colliding(tmp_path: Path) -> None:
    # A header and three records (412 bytes) pass 400: every flush rotates.
    logs = [RequestLog(tmp_path, worker=n, max_file_bytes=400, retain_files=2) for n in range(3)]
    for second in range(5):
        for n, log in enumerate(logs):
            for _ in range(3):
                record(log, ts=T0 + second, vm_id=f"vm-{n}")
            log.flush(T0 + second)  # every worker rotates at the same instant
    for n in range(3):
        mine = rotated_files(tmp_path, worker=n)
        assert len(mine) == 2
        for _, path in mine:
            assert {line["vm"] for line in lines_of(path)} == {f"vm-{n}"}
    assert len(os.listdir(tmp_path)) == 6
    for log in logs:
        assert log.errors == 0
        log.close(T0 + 10)


def test_a_full_buffer_drops_and_counts_and_reports_once_per_streak(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0)
    for _ in range(MAX_BUFFERED_RECORDS + 5):
        record(log)
    assert log.buffered == MAX_BUFFERED_RECORDS and log.dropped == 5
    log.flush(T0 + 1)
    assert log.written == MAX_BUFFERED_RECORDS
    assert log.take_events() == [("request_log_dropping", {"dropped": 5, "buffer": MAX_BUFFERED_RECORDS})]
    for _ in range(MAX_BUFFERED_RECORDS + 1):  # still overloaded the next second: no new event
        record(log)
    log.flush(T0 + 2)
    assert log.dropped == 6 and log.take_events() == []
    log.flush(T0 + 3)  # a second without drops ends the streak
    for _ in range(MAX_BUFFERED_RECORDS + 2):
        record(log)
    log.flush(T0 + 4)
    assert log.take_events() == [("request_log_dropping", {"dropped": 8, "buffer": MAX_BUFFERED_RECORDS})]
    log.close(T0 + 5)


def test_an_unwritable_directory_is_counted_and_reported_once_never_raised(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.write_bytes(b"a file where the directory should be")
    log = RequestLog(directory, worker=0)
    record(log)
    log.flush(T0)
    assert (log.errors, log.lost, log.written) == (1, 1, 0)
    assert log.last_error is not None and log.last_error.startswith("NotADirectoryError: Not a directory")
    [(event, fields)] = log.take_events()
    assert event == "request_log_error" and fields["error"] == log.last_error
    record(log)
    record(log)
    log.flush(T0 + 1)
    assert (log.errors, log.lost) == (2, 3) and log.take_events() == []  # still failing: reported once
    directory.unlink()
    directory.mkdir()
    record(log)
    log.flush(T0 + 2)
    assert log.written == 1
    assert log.take_events() == [("request_log_recovered", {"errors": 2, "lost": 3})]
    log.close(T0 + 3)


def test_a_full_disk_is_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "requests.w000.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    log = RequestLog(tmp_path, worker=0)
    record(log)
    log.flush(T0)
    assert log.errors == 1 and log.lost == 1
    assert log.last_error is not None and "No space left on device" in log.last_error
    log.close(T0 + 1)
    assert log.errors == 1  # close() flushed nothing new and did not fail again


def test_a_removed_directory_is_made_again(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    log = RequestLog(directory, worker=0)
    record(log)
    log.flush(T0)
    assert len(lines_of(directory / "requests.w000.jsonl")) == 1
    log.close(T0)


def test_an_unencodable_record_is_left_out_and_the_rest_written(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, worker=0)
    record(log, status=200)
    record(log, generation=object())
    record(log, status=201)
    log.flush(T0)
    assert [line["status"] for line in lines_of(tmp_path / "requests.w000.jsonl")] == [200, 201]
    assert (log.written, log.lost, log.errors) == (2, 1, 1)
    [(event, _)] = log.take_events()
    assert event == "request_log_unencodable"
    log.close(T0)


def test_a_restart_continues_a_file_that_ends_mid_line(tmp_path: Path) -> None:
    current = tmp_path / "requests.w000.jsonl"
    current.write_bytes(orjson.dumps({"ts": T0, "status": 200}) + b'\n{"ts": 1795000001.0, "sta')
    log = RequestLog(tmp_path, worker=0, max_file_age_s=3600)
    record(log, ts=T0 + 10, status=204)
    log.flush(T0 + 10)
    lines = current.read_bytes().splitlines()
    assert lines[1] == b'{"ts": 1795000001.0, "sta'  # the torn record stays torn, alone on its line
    assert lines[2] + b"\n" == HEADER  # this process names the fields of what it appends
    assert lines_of_after_header(lines[2:])[0]["status"] == 204
    # the file's age counts from its first record, not from the restart
    log.flush(T0 + 3600)
    assert not current.exists() and len(rotated_files(tmp_path)) == 1
    log.close(T0 + 3601)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48", (48, None)),
        ("0", (0, None)),
        ("7d", (UNLIMITED_FILES, 7 * 86400.0)),
        ("12h", (UNLIMITED_FILES, 12 * 3600.0)),
        ("30m", (UNLIMITED_FILES, 1800.0)),
        ("90s", (UNLIMITED_FILES, 90.0)),
        ("48,7d", (48, 7 * 86400.0)),
        ("7d, 48", (48, 7 * 86400.0)),
    ],
)
def test_parse_retention(text: str, expected: tuple[int, float | None]) -> None:
    assert parse_retention(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a file count"),
        ("-1", "neither a file count"),
        ("7w", "neither a file count"),
        ("1.5d", "neither a file count"),
        ("d", "neither a file count"),
        ("0d", "the age must be more than 0"),
        ("48,96", "two file counts"),
        ("7d,12h", "two ages"),
        ("48,7d,1", "expected a file count"),
    ],
)
def test_parse_retention_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_retention(text)


def test_stamps_round_trip() -> None:
    stamp_us = 1_795_000_000_123_456
    assert format_stamp(stamp_us) == "20261118T110640.123456Z"
    assert parse_stamp(format_stamp(stamp_us)) == stamp_us


def test_bad_construction_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="worker"):
        RequestLog(tmp_path, worker=-1)
    with pytest.raises(ValueError, match="max_file_bytes"):
        RequestLog(tmp_path, worker=0, max_file_bytes=0)
    with pytest.raises(ValueError, match="retain"):
        RequestLog(tmp_path, worker=0, retain_age_s=0)


def test_record_read_writes_what_record_writes(tmp_path: Path) -> None:
    one_by_one = RequestLog(tmp_path / "a", worker=0)
    at_once = RequestLog(tmp_path / "b", worker=0)
    replies = [(("GET", TARGET, 200), 10), (("HEAD", "/metadata/versions", 200), 0), (("GET", "/x", 404), 20)]
    for (method, target, status), size in replies:
        one_by_one.record(T0, "10.0.0.4", "vm-1", method, target, status, size, 77, 3)
    at_once.record_read(T0, ("10.0.0.4", "vm-1", 3), 77, replies)
    for log in (one_by_one, at_once):
        log.close(T0 + 1)
    assert lines_of(tmp_path / "a" / "requests.w000.jsonl") == lines_of(tmp_path / "b" / "requests.w000.jsonl")
    assert len(lines_of(tmp_path / "b" / "requests.w000.jsonl")) == 3


def test_record_read_drops_what_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastimds.ops import request_log as requestlog

    monkeypatch.setattr(requestlog, "MAX_BUFFERED_VALUES", 2 * len(FIELDS))
    log = RequestLog(tmp_path, worker=0)
    log.record_read(T0, ("10.0.0.4", "vm-1", 1), 1, [(("GET", "/a", 200), 1)] * 3)
    assert (log.buffered, log.dropped) == (2, 1)
    log.close(T0)


# ---- what the protocol hands over ----


def logged_connection(tmp_path: Path) -> tuple[Any, Any, RequestLog]:
    from tests.support.fakes import make_connection

    protocol, transport, state = make_connection(peer="10.0.0.9")
    log = RequestLog(tmp_path, worker=0)
    protocol.request_log = state.request_log = log
    return protocol, transport, log


def test_the_protocol_records_every_reply_parsed_remembered_or_pipelined(tmp_path: Path) -> None:
    from tests.support.fakes import request, split_responses

    protocol, transport, log = logged_connection(tmp_path)
    leaf = request("/metadata/instance/compute/name?api-version=2021-02-01&format=text")
    protocol.data_received(leaf)  # parsed, then remembered
    protocol.data_received(leaf)  # answered from the request memo: the inlined one-reply path
    protocol.data_received(leaf)
    protocol.data_received(leaf + request("/metadata/versions", headers=()))  # two replies in one read
    responses = split_responses(transport.output)
    buffered = list(zip(*[iter(log.buffer)] * len(FIELDS), strict=True))
    leaf = ("GET", "/metadata/instance/compute/name?api-version=2021-02-01&format=text", 200)
    assert [(head, sent) for head, _ts, sent, _latency in buffered] == [
        (("10.0.0.9", "default", 1), (leaf, len(responses[index].body))) for index in range(4)
    ] + [(("10.0.0.9", "default", 1), (("GET", "/metadata/versions", 400), len(responses[4].body)))]
    assert all(isinstance(ts, float) and isinstance(latency, int) for _head, ts, _sent, latency in buffered)
    # The hot path copies nothing: one head per connection and generation, one sent per remembered reply.
    assert buffered[1][0] is buffered[2][0] and buffered[1][2] is buffered[2][2]


def test_the_protocols_inlined_record_drops_and_counts_when_the_buffer_is_full(tmp_path: Path) -> None:
    from tests.support.fakes import request

    protocol, _transport, log = logged_connection(tmp_path)
    leaf = request("/metadata/instance/compute/name?api-version=2021-02-01&format=text")
    protocol.data_received(leaf)  # parsed: remembered from now on
    log.buffer[:] = [0] * MAX_BUFFERED_VALUES
    protocol.data_received(leaf)
    protocol.data_received(leaf)
    assert (len(log.buffer), log.dropped) == (MAX_BUFFERED_VALUES, 2)


def test_a_target_holding_the_record_boundary_cannot_split_or_hide_a_record(tmp_path: Path) -> None:
    # Regression: a string ending in "],[[" is followed by its closing quote, which makes the
    # bytes that separate records; one replace then split this record in two corrupt lines.
    log = RequestLog(tmp_path, worker=0)
    for target in ("/metadata/instance?api-version=2021-02-01&x=],[[", "/metadata/versions", "/a],[[b],[["):
        record(log, target=target)
    log.close(T0 + 1)
    records = lines_of(tmp_path / "requests.w000.jsonl")
    assert [r["target"] for r in records] == [
        "/metadata/instance?api-version=2021-02-01&x=],[[",
        "/metadata/versions",
        "/a],[[b],[[",
    ]


def test_replies_fed_after_a_held_reply_are_logged_when_they_are_sent(tmp_path: Path) -> None:
    # Regression: replies produced from the backlog after a delay ended (outside data_received)
    # stayed on the connection until a later read, and were lost if none came.
    import asyncio

    from fastimds.http.connection import FEED_SLICE_BYTES
    from fastimds.imds.faults import Fault
    from tests.support.fakes import request, split_responses

    protocol, transport, log = logged_connection(tmp_path)
    record = {"id": "f1", "vms": None, "path": "/metadata/instance", "status": None, "latencyMs": 20}
    record |= {"reset": False, "retryAfter": None, "until": None, "count": None, "slot": 0}
    protocol.state.faults.faults, protocol.state.faults.active = [Fault(record)], True
    pad = request("/metadata/versions")
    count = 2 * FEED_SLICE_BYTES // len(pad)

    async def scenario() -> None:
        protocol.data_received(request() + pad * count)  # the first reply is delayed, the rest wait behind it
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert len(split_responses(transport.output)) == 1 + count
    assert (log.buffered, protocol.logged) == (1 + count, [])


def test_a_released_long_poll_is_counted_and_logged_once_without_a_latency(tmp_path: Path) -> None:
    from fastimds.imds.datafile import parse_vm
    from fastimds.ops.telemetry import LAYOUT
    from tests.support.fakes import request, sample_vm, split_responses

    protocol, transport, log = logged_connection(tmp_path)
    counters = protocol.state.counters
    assert counters is not None
    ok_slot = LAYOUT.request_slot("instance", 200)
    target = "/metadata/instance/compute/location?api-version=2021-02-01&format=text&wait_for_change=true"
    protocol.data_received(request(target))
    assert transport.output == b"" and log.buffered == 0 and counters[ok_slot] == 0  # held
    changed = sample_vm().instance | {"compute": sample_vm().instance["compute"] | {"location": "eastus"}}
    protocol.vm.publish(parse_vm(orjson.dumps({"instance": changed}), "test"))  # releases it
    assert [r.body for r in split_responses(transport.output)] == [b"eastus"]
    assert counters[ok_slot] == 1
    [(head, _ts, sent, latency_us)] = list(zip(*[iter(log.buffer)] * len(FIELDS), strict=True))
    assert (head, sent, latency_us) == (("10.0.0.9", "default", 2), (("GET", target, 200), len(b"eastus")), 0)
