"""`fastimds logs`: merged, filtered request logs, written by the real RequestLog.

`fastimds logs` as a process whose reader goes away is in tests/e2e/test_logs_cli_e2e.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from fastimds.cli import logs as logs_cli
from fastimds.cli.main import build_parser, main
from fastimds.ops.request_log import rotated_files
from fastimds.ops.request_log_format import RECORD_KEYS
from tests.support.request_logs import T0, write_log


def run_logs(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    code = main(["logs", *argv])
    captured = capsys.readouterr()
    records = [orjson.loads(line) for line in captured.out.splitlines()]
    return code, records, captured.err


@pytest.fixture
def busy_dir(tmp_path: Path) -> Path:
    """Two workers, interleaved in time, each with rotated files; a mix of statuses, VMs, paths, callers."""
    write_log(
        tmp_path,
        0,
        [
            {"ts": T0 + 1, "status": 200, "caller": "10.0.0.4"},
            {"ts": T0 + 3, "status": 404, "target": "/metadata/nope?api-version=2021-02-01", "caller": "10.0.1.9"},
            {"ts": T0 + 5, "status": 503, "caller": "10.0.0.4"},
            {"ts": T0 + 7, "status": 200, "target": "/metadata/versions", "caller": "10.0.0.5"},
        ],
        max_file_bytes=300,
    )
    write_log(
        tmp_path,
        1,
        [
            {"ts": T0 + 2, "status": 500, "caller": "10.0.1.7"},
            {"ts": T0 + 4, "status": 200, "target": "/metadata/instance/compute/vmId?format=text"},
            {"ts": T0 + 6, "status": 400, "target": "/metadata/instance?x=/metadata/versions"},
        ],
        max_file_bytes=300,
    )
    assert len(rotated_files(tmp_path, 0)) >= 1 and len(rotated_files(tmp_path, 1)) >= 1
    return tmp_path


def test_every_file_of_every_worker_is_merged_in_time_order(busy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, records, err = run_logs(capsys, str(busy_dir))
    assert code == 0 and err == ""
    assert [r["ts"] - T0 for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["vm"] for r in records] == ["vm-0", "vm-1", "vm-0", "vm-1", "vm-0", "vm-1", "vm-0"]


def test_records_are_printed_as_json_objects(busy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["logs", str(busy_dir), "--status", "404"])
    [line] = capsys.readouterr().out.encode().splitlines()
    printed = orjson.loads(line)
    assert list(printed) == list(RECORD_KEYS)  # on disk an array under a header; printed as an object
    assert (printed["status"], printed["caller"], printed["vm"]) == (404, "10.0.1.9", "vm-0")


@pytest.mark.parametrize(
    ("flags", "expected_offsets"),
    [
        (["--status", "5xx"], [2, 5]),
        (["--status", "404"], [3]),
        (["--status", "4xx,500"], [2, 3, 6]),
        (["--status", "200"], [1, 4, 7]),
        (["--vm", "vm-1"], [2, 4, 6]),
        (["--vm", "vm-9"], []),
        (["--path", "/metadata/instance"], [1, 2, 4, 5, 6]),  # the query is not the path
        (["--path", "/metadata/versions"], [7]),
        (["--caller", "10.0.0.4"], [1, 4, 5, 6]),
        (["--caller", "10.0.1.0/24"], [2, 3]),
        (["--since", "2026-11-18T11:06:44Z"], [4, 5, 6, 7]),
        (["--until", "2026-11-18T11:06:44Z"], [1, 2, 3]),
        (["--since", "2026-11-18T11:06:42", "--until", "2026-11-18T11:06:45+00:00"], [2, 3, 4]),
        (["--status", "2xx", "--vm", "vm-0", "--caller", "10.0.0.5"], [7]),
        (["--limit", "2"], [1, 2]),
        (["--tail", "2"], [6, 7]),
        (["--status", "200", "--tail", "1"], [7]),
    ],
)
def test_filters(
    busy_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected_offsets: list[int]
) -> None:
    code, records, _ = run_logs(capsys, str(busy_dir), *flags)
    assert code == 0
    assert [r["ts"] - T0 for r in records] == expected_offsets


def test_since_as_a_duration_before_now(busy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["logs", str(busy_dir), "--since", "3s"])
    assert logs_cli.run(args, now=T0 + 7) == 0
    assert [orjson.loads(line)["ts"] - T0 for line in capsys.readouterr().out.splitlines()] == [4, 5, 6, 7]
    args = build_parser().parse_args(["logs", str(busy_dir), "--since", "10m"])
    assert logs_cli.run(args, now=T0 + 3600) == 0
    assert capsys.readouterr().out == ""


def test_rotated_files_closed_long_before_since_are_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = {"ts": T0, "caller": "c", "vm": "v", "method": "GET", "target": "/", "status": 200}
    line |= {"bytes": 1, "latency_us": 1, "generation": 1}
    # a file that says it was closed a day before its (impossible) contents
    (tmp_path / "requests.20261117T110640.000000Z.w000.jsonl").write_bytes(orjson.dumps(line) + b"\n")
    assert run_logs(capsys, str(tmp_path))[1] != []
    assert run_logs(capsys, str(tmp_path), "--since", "2026-11-18T00:00:00Z")[1] == []


def test_corrupt_lines_are_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(tmp_path, 0, [{"ts": T0 + 1}, {"ts": T0 + 3}])
    current = tmp_path / "requests.w000.jsonl"
    good = current.read_bytes()
    missing_key = orjson.dumps({"ts": T0 + 2, "caller": "x"})
    wrong_type = {"ts": T0 + 2, "caller": "c", "vm": "v", "method": "GET", "target": "/", "status": "200"}
    wrong_type |= {"bytes": 1, "latency_us": 1, "generation": 1}
    current.write_bytes(
        good + b'{"ts": 1795000002.0, "cal\n' + b"\x00\x00garbage\n" + missing_key + b"\n" + orjson.dumps(wrong_type)
    )
    write_log(tmp_path, 1, [{"ts": T0 + 2}])
    code, records, err = run_logs(capsys, str(tmp_path))
    assert code == 0
    assert [r["ts"] - T0 for r in records] == [1, 2, 3]
    assert err == "fastimds logs: skipped 4 corrupt lines: requests.w000.jsonl (4)\n"


def test_table_format_aligns_columns(busy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logs", str(busy_dir), "--format", "table"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["TIME", "CALLER", "VM", "METHOD", "STATUS", "BYTES", "LATENCY_US", "GEN", "TARGET"]
    assert len(rows) == 7
    assert rows[0].startswith("2026-11-18T11:06:41.000Z  10.0.0.4")
    target_at = header.index("TARGET")
    status_ends = header.index("STATUS") + len("STATUS")
    for row in rows:
        assert row[target_at - 2 : target_at] == "  " and row[target_at] == "/"
        assert row[status_ends - 3 : status_ends].isdigit() and row[status_ends] == " "
    assert rows[2].split()[4] == "404" and rows[2].endswith("/metadata/nope?api-version=2021-02-01")


def test_no_files_no_matches_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_logs(capsys, str(tmp_path)) == (0, [], "")
    assert main(["logs", str(tmp_path), "--format", "table"]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--status", "5x"], "--status: '5x' is neither a status code"),
        (["--status", "600"], "--status: '600'"),
        (["--since", "yesterday"], "--since/--until: 'yesterday' is neither a duration"),
        (["--until", "10 minutes"], "--since/--until"),
        (["--caller", "10.0.0.0/99"], "--caller: '10.0.0.0/99'"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_bad_arguments_exit_2(
    busy_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    code, records, err = run_logs(capsys, str(busy_dir), *flags)
    assert code == 2 and records == []
    assert err.startswith(f"fastimds logs: {message}")


def test_a_missing_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert run_logs(capsys, str(missing)) == (2, [], f"fastimds logs: {missing} is not a directory\n")


def test_argparse_errors_exit_2(busy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--limit", "x"], ["--limit", "1", "--tail", "1"], ["--format", "xml"]):
        with pytest.raises(SystemExit) as exited:
            main(["logs", str(busy_dir), *argv])
        assert exited.value.code == 2
    capsys.readouterr()


def test_every_format_this_project_has_written_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Lines of objects (the first format), flat arrays under a version 1 header, nested ones under version 2."""
    expected = {
        "ts": T0,
        "caller": "10.0.0.4",
        "vm": "vm-0",
        "method": "GET",
        "target": "/metadata/versions",
        "status": 200,
        "bytes": 61,
        "latency_us": 87,
        "generation": 3,
    }
    v1_fields = ["caller", "ts", "vm", "method", "target", "status", "bytes", "latency_us", "generation"]
    v2_fields = [["caller", "vm", "generation"], "ts", [["method", "target", "status"], "bytes"], "latency_us"]
    lines = [
        orjson.dumps(expected),
        orjson.dumps({"fastimds_request_log": 1, "fields": v1_fields}),
        orjson.dumps([expected[name] for name in v1_fields]),
        orjson.dumps({"fastimds_request_log": 2, "fields": v2_fields}),
        orjson.dumps([["10.0.0.4", "vm-0", 3], T0, [["GET", "/metadata/versions", 200], 61], 87]),
        orjson.dumps([["10.0.0.4", "vm-0"], T0, [["GET", "/metadata/versions", 200], 61], 87]),  # wrong shape
    ]
    (tmp_path / "requests.w000.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code, records, err = run_logs(capsys, str(tmp_path))
    assert code == 0
    assert records == [expected] * 3
    assert "1 corrupt line" in err


def test_the_writer_writes_the_nested_format_its_header_names(tmp_path: Path) -> None:
    sneaky = '/a"],[["b'  # a target holding the record boundary's bytes, but for the escaping
    write_log(tmp_path, 0, [{"ts": T0, "target": sneaky}])
    header, line = (tmp_path / "requests.w000.jsonl").read_bytes().splitlines()
    assert orjson.loads(header)["fields"] == [
        ["caller", "vm", "generation"], "ts", [["method", "target", "status"], "bytes"], "latency_us"
    ]  # fmt: skip
    assert orjson.loads(line) == [["10.0.0.4", "vm-0", 1], T0, [["GET", sneaky, 200], 100], 50]
