"""read_description: only regular files, never blocking, never more than the limit plus one byte.

The same attacks on a real server's --data-dir are in tests/e2e/test_data_dir_files_e2e.py.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from fastimds.imds.datafile import MAX_VM_FILE_BYTES, DataError
from fastimds.sources.files import UnreadableFile, read_description


def test_a_regular_file_and_a_symlink_to_one_are_read(tmp_path: Path) -> None:
    target = tmp_path / "vm.json"
    target.write_bytes(b'{"instance": {}}')
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert read_description(target, 100) == read_description(link, 100) == b'{"instance": {}}'
    assert read_description(target, 16) == b'{"instance": {}}'  # exactly the limit is allowed


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "x.json"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_description(fifo, MAX_VM_FILE_BYTES)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    started = time.monotonic()
    reader.start()
    reader.join(timeout=2)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert time.monotonic() - started < 1
    [error] = outcome
    assert isinstance(error, UnreadableFile) and isinstance(error, DataError)
    assert error.problems == ["not a regular file (a FIFO): only regular files are read"]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_a_symlink_to_a_device_is_refused(tmp_path: Path, device: str) -> None:
    link = tmp_path / "x.json"
    link.symlink_to(device)
    with pytest.raises(UnreadableFile) as caught:
        read_description(link, MAX_VM_FILE_BYTES)
    assert caught.value.problems == ["not a regular file (a character device): only regular files are read"]
    assert caught.value.source == str(link)


def test_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").mkdir()
    with pytest.raises(UnreadableFile, match="a folder"):
        read_description(tmp_path / "x.json", MAX_VM_FILE_BYTES)


def test_an_oversized_file_is_refused_by_its_size_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as handle:
        handle.truncate(300 * 1024 * 1024)  # sparse: no disk, and no time to write
    started = time.monotonic()
    with pytest.raises(UnreadableFile) as caught:
        read_description(big, MAX_VM_FILE_BYTES)
    assert time.monotonic() - started < 0.1  # reading 300 MiB of zeros takes far longer
    assert caught.value.problems == [f"$: file is {300 * 1024 * 1024} bytes, over the {MAX_VM_FILE_BYTES}-byte limit"]


def test_a_file_longer_than_its_size_says_is_cut_at_the_limit_plus_one(tmp_path: Path) -> None:
    # /proc files are regular and report size 0: the same as a file that grew after the fstat.
    link = tmp_path / "x.json"
    link.symlink_to("/proc/self/status")
    with pytest.raises(UnreadableFile) as caught:
        read_description(link, 100)
    assert caught.value.problems == ["$: file is over the 100-byte limit"]


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_description(tmp_path / "gone.json", MAX_VM_FILE_BYTES)
