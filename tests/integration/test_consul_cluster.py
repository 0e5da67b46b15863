"""A real three-server Consul cluster with a client agent per "host" on loopback addresses of
their own (scripts/consul_cluster.py): what several hosts give that a dev agent cannot."""

from __future__ import annotations

import time
from pathlib import Path

from scripts.consul_cluster import ConsulCluster
from scripts.processes import wait_until


def test_a_service_registered_on_one_host_is_seen_from_the_other_through_a_leader_kill(
    tmp_path: Path,
) -> None:
    with ConsulCluster(tmp_path, servers=3, hosts=("a", "b")) as cluster:
        host_a, host_b = cluster.clients["a"], cluster.clients["b"]
        host_a.api(
            "/v1/agent/service/register",
            method="PUT",
            body={"Name": "catalog", "ID": "catalog-on-a", "Port": 7001, "Address": host_a.host},
        )
        wait_until(
            lambda: (
                [e["ServiceID"] for e in host_b.api("/v1/catalog/service/catalog")]
                == ["catalog-on-a"]
            ),
            timeout=10,
            message="host b does not see host a's registration",
        )
        leader = cluster.leader()
        assert leader is not None
        leader.kill()  # SIGKILL, as a crashed machine
        killed_at = time.monotonic()
        elected = wait_until(
            lambda: (new := cluster.leader(via=host_b)) is not None and new is not leader and new,
            timeout=30,
            interval=0.1,
            message="no new leader after the old one was killed",
            ignore=(OSError, ValueError),
        )
        assert elected.is_running
        assert time.monotonic() - killed_at < 30
        # The catalog survived on the remaining quorum; host b still answers from it.
        entries = host_b.api("/v1/catalog/service/catalog")
        assert [e["ServiceID"] for e in entries] == ["catalog-on-a"]
        assert entries[0]["ServiceAddress"] == host_a.host
