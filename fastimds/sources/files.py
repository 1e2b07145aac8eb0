"""Reading a VM description file from a folder someone else writes to (--data-dir).

Rules of this module:
- Only a regular file is read. A symlink to one is followed; a symlink to a
  device (/dev/zero), a FIFO, a socket or a folder is refused before it is
  opened, and again after (fstat), since the name may change in between.
- Opening never waits: O_NONBLOCK, so a FIFO whose writer never comes cannot
  stall the event loop that reads the folder.
- Reading never takes more than the limit: a file whose size is over it is
  refused without reading a byte, and one that grows while it is read is cut
  at the limit plus one byte and refused.
- Every refusal is an UnreadableFile, a DataError naming the one problem, so
  callers report it as they report a file that does not validate.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastimds.imds.datafile import DataError

# What a non-regular file is called in a refusal.
FILE_KINDS: dict[int, str] = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}
# os.read asks for at most this much at a time (a description is a few KiB).
READ_CHUNK_BYTES = 64 * 1024


class UnreadableFile(DataError):
    """A file that is not read: not a regular file, or over the size limit."""


def _kind_problem(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    kind = FILE_KINDS.get(stat.S_IFMT(mode), "of an unknown kind")
    return f"not a regular file ({kind}): only regular files are read"


def _size_problem(size: int, limit: int) -> str:
    return f"$: file is {size} bytes, over the {limit}-byte limit"


def read_description(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path` (at most `limit`), or UnreadableFile naming the problem.

    OSError (the file vanished, no permission) propagates, as from open().
    """
    problem = _kind_problem(os.stat(path).st_mode)  # follows a symlink: its target must be a regular file
    if problem:
        raise UnreadableFile(str(path), [problem])
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)  # what was opened, should the name have been swapped since the stat
        problem = _kind_problem(status.st_mode)
        if problem:
            raise UnreadableFile(str(path), [problem])
        if status.st_size > limit:
            raise UnreadableFile(str(path), [_size_problem(status.st_size, limit)])
        chunks: list[bytes] = []
        taken = 0
        while taken <= limit:
            chunk = os.read(fd, min(READ_CHUNK_BYTES, limit + 1 - taken))
            if not chunk:
                break
            chunks.append(chunk)
            taken += len(chunk)
        if taken > limit:  # it grew while being read
            raise UnreadableFile(str(path), [f"$: file is over the {limit}-byte limit"])
        return b"".join(chunks)
    finally:
        os.close(fd)
