"""Files written whole, and how to tell a changed file without reading it.

Rules of this module:
- A write is a new temp file (name starting with layout.TEMP_PREFIX, which
  readers skip), written whole, fsynced when durable, then renamed over the
  old file and the directory fsynced: a reader sees the old file or the new
  one, never a half-written one, and after a crash the last acknowledged
  write is there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fastimds.bus.layout import TEMP_PREFIX


def write_whole(path: Path, data: bytes, durable: bool) -> None:
    """Write `path` whole under a temp name, then rename it into place (see the
    module rules); with `durable`, the file and then its directory are fsynced first."""
    descriptor, temp_name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def file_stamps(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    """(mtime_ns, size) of each file that exists: enough to tell a changed file without reading it."""
    found = {}
    for path in paths:
        try:
            status = path.stat()
        except FileNotFoundError:
            continue
        found[path] = (status.st_mtime_ns, status.st_size)
    return found
