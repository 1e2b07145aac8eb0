"""`fastimds logs` as its own process, its output piped to a reader that goes away (`| head -1`).

The command's merging, filtering and formats, in process, are in tests/unit/cli/test_logs_cli.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.support.request_logs import T0, write_log


def test_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    write_log(tmp_path, 0, [{"ts": T0 + n / 1000} for n in range(3000)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastimds", "logs", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=30) == 0, stderr
    assert orjson.loads(first)["ts"] == T0 and stderr == b""
