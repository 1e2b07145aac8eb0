"""Locust traffic mix for fastimds: what the VMs on one host send.

Each user is one VM's agents. Weights approximate a host where scripts read
text leaves often, guest agents poll the instance document and scheduled
events, provisioning fetches the extended document now and then, and a few
requests are wrong.
A bad request counts as a failure only when its status is not the one
Azure's IMDS documents for it.

The pace is set by the runner (loadtest/run.py) through LOADTEST_USER_RPS:
every user sends that many requests per second (constant throughput), so
users x rate is the offered load, independent of how fast replies come.
"""

from __future__ import annotations

import os

from locust import constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser

METADATA = {"Metadata": "true"}
TEXT_LEAVES = (
    "/metadata/instance/compute/vmId?api-version=2017-04-02&format=text",
    "/metadata/instance/compute/location?api-version=2021-01-01&format=text",
    "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress?api-version=2021-02-01&format=text",
    "/metadata/instance/compute/userData?api-version=2021-01-01&format=text",
)


class VmAgents(FastHttpUser):
    wait_time = constant_throughput(float(os.environ.get("LOADTEST_USER_RPS", "10")))
    leaf_index = 0

    @task(10)
    def script_reads_a_text_leaf(self) -> None:
        self.leaf_index = (self.leaf_index + 1) % len(TEXT_LEAVES)
        self.client.get(TEXT_LEAVES[self.leaf_index], headers=METADATA, name="text leaf")

    @task(4)
    def guest_agent_health_check(self) -> None:
        # WALinuxAgent's once-a-minute heartbeat, at its pinned version.
        self.client.get("/metadata/instance?api-version=2018-02-01", headers=METADATA, name="instance (health)")

    @task(2)
    def provisioning_fetches_the_extended_document(self) -> None:
        # cloud-init's first call.
        self.client.get(
            "/metadata/instance?api-version=2021-08-01&extended=true", headers=METADATA, name="instance extended"
        )

    @task(3)
    def scheduled_events_poll(self) -> None:
        # Azure recommends polling scheduled events once a second (k8s cloud-provider, the samples).
        self.client.get("/metadata/scheduledevents?api-version=2020-07-01", headers=METADATA, name="scheduled events")

    @task(1)
    def versions(self) -> None:
        self.client.get("/metadata/versions", headers=METADATA, name="versions")

    @task(1)
    def bad_request_without_header(self) -> None:
        self._expect_status("/metadata/instance?api-version=2021-02-01", {}, 400, "bad: no Metadata header")

    @task(1)
    def bad_request_without_api_version(self) -> None:
        # MSAL region discovery's probe.
        self._expect_status("/metadata/instance/compute/location?format=json", METADATA, 400, "bad: no api-version")

    def _expect_status(self, path: str, headers: dict[str, str], status: int, name: str) -> None:
        with self.client.get(path, headers=headers, name=name, catch_response=True) as response:
            if response.status_code == status and response.headers.get("Content-Type", "").startswith(
                "application/json"
            ):
                response.success()
            else:
                response.failure(f"expected {status} with a JSON body, got {response.status_code}")
