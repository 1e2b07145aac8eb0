"""Counting files renamed into a directory, as they arrive (Linux inotify through ctypes).

The bus writes every file under a temp name and renames it into place
(fastimds.bus.atomic), so one IN_MOVED_TO is one file written, even when the
reader deletes it a millisecond later (the control takes approval files at
once: listing the folder would miss them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
from pathlib import Path
from types import TracebackType

IN_MOVED_TO = 0x00000080
_EVENT_HEAD = struct.Struct("iIII")  # wd, mask, cookie, len


class FileArrivals:
    """A context manager: `count` is the files renamed into `directory` whose names end with `suffix`."""

    def __init__(self, directory: Path, suffix: str = ".json") -> None:
        self.directory = directory
        self.suffix = suffix
        self.count = 0
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> FileArrivals:
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK)
        if self._fd < 0 or self._libc.inotify_add_watch(self._fd, str(self.directory).encode(), IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify")
        self._thread.start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self._fd)

    def _read(self) -> None:
        while not self._stop.is_set() or select.select([self._fd], [], [], 0)[0]:
            if not select.select([self._fd], [], [], 0.05)[0]:
                continue
            data = os.read(self._fd, 65536)
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _EVENT_HEAD.unpack_from(data, offset)
                name = data[offset + _EVENT_HEAD.size : offset + _EVENT_HEAD.size + length].rstrip(b"\0")
                offset += _EVENT_HEAD.size + length
                if mask & IN_MOVED_TO and name.decode(errors="replace").endswith(self.suffix):
                    self.count += 1
