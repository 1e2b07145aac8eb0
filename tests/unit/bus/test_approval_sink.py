"""Issue 16, Medium 3: approvals leave the request path, batched, and each VM's are rate-limited.

`BusApprovals.approve` runs inside a parser callback: no I/O there. Files
are written at most one per APPROVAL_BATCH_S, off the loop; a VM past
APPROVALS_PER_VM_PER_S gets False (the connection answers 429).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fastimds.bus import approvals as approvals_module
from fastimds.bus.approvals import APPROVAL_BATCH_S, APPROVALS_PER_VM_PER_S, BusApprovals, take_approvals
from fastimds.ops.event_log import EventLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "approvals").glob("*.json"))


async def settled(sink: BusApprovals) -> None:
    """Until the sink has nothing due or being written."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + 5
    while (sink.flushing or sink.pending) and loop.time() < give_up_at:
        await asyncio.sleep(APPROVAL_BATCH_S / 5)


def test_many_approvals_in_one_tick_are_one_file(tmp_path: Path) -> None:
    written: list[int] = []
    sink = BusApprovals(tmp_path, durable=True, written=lambda: written.append(1))

    async def scenario() -> None:
        for index in range(400):  # 200 VMs, two events each
            assert sink.approve(f"vm-{index // 2}", frozenset({f"E{index % 2}"}))
        assert files(tmp_path) == []  # nothing written inside approve (it runs in a parser callback)
        await settled(sink)

    asyncio.run(scenario())
    assert (len(files(tmp_path)), sink.files_written, written) == (1, 1, [1])
    taken = take_approvals(tmp_path / "approvals", EventLog())
    assert taken == {f"vm-{index}": frozenset({"E0", "E1"}) for index in range(200)}


def test_a_flood_of_one_approval_writes_one_file(tmp_path: Path) -> None:
    sink = BusApprovals(tmp_path, durable=True)

    async def scenario() -> None:
        for _ in range(2000):
            assert sink.approve("vm-1", frozenset({"E1"}))  # the same approval again: 200, nothing more
        await settled(sink)

    asyncio.run(scenario())
    assert sink.files_written == 1 and sink.refused == 0


def test_batches_are_at_most_one_per_interval(tmp_path: Path) -> None:
    sink = BusApprovals(tmp_path, durable=False)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index in range(30):  # a new VM's approval every few ms, for ~0.15 s
            sink.approve(f"vm-{index}", frozenset({"E1"}))
            await asyncio.sleep(APPROVAL_BATCH_S / 10)
        await settled(sink)
        return loop.time() - started

    elapsed = asyncio.run(scenario())
    assert sink.files_written <= elapsed / APPROVAL_BATCH_S + 1
    assert sum(len(ids) for ids in take_approvals(tmp_path / "approvals", EventLog()).values()) == 30


def test_each_vm_gets_its_rate_a_second_then_false(tmp_path: Path) -> None:
    clock = Clock()
    sink = BusApprovals(tmp_path, durable=False, clock=clock)
    for index in range(APPROVALS_PER_VM_PER_S):
        assert sink.approve("vm-1", frozenset({f"E{index}"}))
    assert not sink.approve("vm-1", frozenset({"E-new"}))  # past the rate: the connection answers 429
    assert sink.approve("vm-1", frozenset({"E0"}))  # one already taken this second: 200, nothing to record
    assert sink.approve("vm-2", frozenset({"E-new"}))  # another VM has its own rate
    clock.now += 1
    assert sink.approve("vm-1", frozenset({"E-new"}))  # a new second
    assert sink.refused == 1


def test_a_stopping_worker_flushes_what_is_noted(tmp_path: Path) -> None:
    sink = BusApprovals(tmp_path, durable=False)

    async def scenario() -> None:
        sink.approve("vm-1", frozenset({"E1"}))
        sink.flush()  # Worker.stop: before the batch is due

    asyncio.run(scenario())
    assert take_approvals(tmp_path / "approvals", EventLog()) == {"vm-1": frozenset({"E1"})}


def test_a_failed_write_is_logged_and_later_approvals_still_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = BusApprovals(tmp_path, durable=False)
    real_write = approvals_module.write_whole
    failures = [OSError(28, "No space left on device")]

    def flaky(path: Path, data: bytes, durable: bool) -> None:
        if failures:
            raise failures.pop()
        real_write(path, data, durable)

    monkeypatch.setattr(approvals_module, "write_whole", flaky)

    async def scenario() -> None:
        sink.approve("vm-1", frozenset({"E1"}))
        await settled(sink)
        sink.approve("vm-2", frozenset({"E2"}))
        await settled(sink)

    asyncio.run(scenario())
    assert not failures
    assert take_approvals(tmp_path / "approvals", EventLog()) == {"vm-2": frozenset({"E2"})}
