"""/metadata/loadbalancer from a real server, its section read from a data file.

The endpoint's rules, without sockets, are in tests/unit/imds/test_loadbalancer.py.
"""

from __future__ import annotations

from typing import Any

import orjson

from tests.support.loadbalancer import SECTION, document_with
from tests.support.server_process import fresh_get, running_server

LB = "/metadata/loadbalancer?api-version=2020-10-01"


def test_served_by_a_real_server(tmp_path: Any) -> None:
    data = tmp_path / "vm.json"
    data.write_bytes(orjson.dumps(document_with(SECTION)))
    with running_server("--data", str(data)) as server:
        status, body = fresh_get(server.port, LB)
        assert status == 200
        assert orjson.loads(body) == {"loadbalancer": SECTION}
