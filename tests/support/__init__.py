"""Shared test helpers: the one place a test module imports helpers from.

Rules of this package:
- Test modules (tests/**/test_*.py) import helpers from here, never from one
  another (tests/unit/test_layout.py checks it): a helper two test files
  need lives here, with its rules, not inside one of them.
- Nothing here is a test, and nothing here is collected: no test_* names.
- What starts a process (server_process.running_server, hostile_clients)
  is for tests/e2e only (tests/unit/test_layout.py checks tests/unit and
  tests/fuzz); the data helpers beside it (vm_document, vm_uuid) and the
  fakes are for any test.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
