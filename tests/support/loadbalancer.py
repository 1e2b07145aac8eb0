"""A VM's "loadbalancer" section for tests: the documented example (spec §10).

Rules of this module: plain data as Azure documents it; tests copy before
they change it.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.support.fakes import sample_vm

# The documented example (spec §10).
SECTION = {
    "publicIpAddresses": [{"frontendIpAddress": "51.0.0.1", "privateIpAddress": "10.1.0.4"}],
    "inboundRules": [
        {
            "frontendIpAddress": "50.0.0.1",
            "protocol": "tcp",
            "frontendPort": 80,
            "backendPort": 443,
            "privateIpAddress": "10.1.0.4",
        }
    ],
    "outboundRules": [{"frontendIpAddress": "50.0.0.1", "privateIpAddress": "10.1.0.4"}],
}


def document_with(section: Any) -> dict[str, Any]:
    """The sample VM's document with its "loadbalancer" section replaced (a copy)."""
    document = copy.deepcopy(sample_vm().document)
    document["loadbalancer"] = section
    return document
