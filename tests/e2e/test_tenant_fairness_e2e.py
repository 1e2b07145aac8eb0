"""End-to-end: one VM's flood of fresh-token requests does not stall another VM on the worker (issue 16, High).

One worker; VM "flooder" pipelines 20,000 token requests for resources no
one asked before (each a fresh RSA signature) on one connection, while VM
"other" sends single requests on its own connection. Before the fix the
whole flood was answered inside one read callback and signed in full: the
other VM waited seconds. Now the connection gives way after a bounded turn
(fastimds.http.turns) and the flooder's fresh signatures are budgeted
(fastimds.imds.signing): every flood reply still arrives, in order, as a
token or a 429. The issue's tight figures (p99 <= 20 ms, max <= 100 ms) are
for a quiet machine: `python -m bench.tenant_flood`.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.server_process import running_server
from tests.support.tenant_flood import FLOOD_REQUESTS, measure, write_fleet

# The other VM's slowest request during the flood, even on a loaded two-core
# machine; before the fix it was seconds (5.8 s in the issue).
OTHER_VM_MAX_S = 1.0


def test_a_fresh_token_flood_from_one_vm_leaves_another_vm_responsive(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_fleet(data_dir)
    with running_server("--data-dir", str(data_dir), "--workers", "1") as server:
        run = measure(server.port, FLOOD_REQUESTS, alone=100)
    flood = run.flood
    assert flood.problems == []
    assert flood.replies == FLOOD_REQUESTS and flood.ok + flood.refused == FLOOD_REQUESTS
    assert 20 <= flood.ok < FLOOD_REQUESTS // 10  # a second's burst, then about 20 a second
    assert run.during.errors == [] and run.alone.errors == []
    assert len(run.during.samples) >= 10, run.during.summary()
    summary = run.during.summary()
    print(f"other VM alone {run.alone.summary()}, during the flood {summary}; ", end="")
    print(f"flood: {flood.ok} x 200, {flood.refused} x 429 in {flood.seconds:.2f} s")
    assert max(run.during.samples) < OTHER_VM_MAX_S, summary
