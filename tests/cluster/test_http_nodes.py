"""--http travels with the cluster configuration: each node serves the master's
HTTP port on its own address (or its own --http), beside the Mongrel2 handlers."""

from __future__ import annotations

import pytest

from fleet.dev.mongrel2 import free_port
from tests.support.load import json_answers
from tests.support.netns import FleetCluster, FleetProc


def http_get(cluster: FleetCluster, address: str, port: int) -> dict:
    """One GET from h1's namespace, answered 200 with JSON."""
    return cluster.h1.call(json_answers, address, port, "/", 1)[0]


def test_nodes_serve_the_masters_http_port_on_their_own_address(cluster: FleetCluster) -> None:
    port, own_port = free_port(), free_port()
    h1, h2, h3 = (cluster.net.host(i) for i in (1, 2, 3))
    cluster.start_mongrel2()
    master = FleetProc(h1, "master", cluster.master_args() + ["--http", f"{h1.address}:{port}"],
                       cluster.workdir / "master-http.log")
    cluster.procs.append(master)
    cluster.master = master
    master.wait_ready()
    cluster.start_node(2)
    cluster.start_node(3, extra=["--http", f"{h3.address}:{own_port}"])

    assert cluster.host_of(http_get(cluster, h1.address, port)) == "h1"
    assert cluster.host_of(http_get(cluster, h2.address, port)) == "h2"  # inherited, on h2's address
    assert cluster.host_of(http_get(cluster, h3.address, own_port)) == "h3"  # its own --http wins
    with pytest.raises(ConnectionRefusedError):
        http_get(cluster, h3.address, port)
    assert set(cluster.served_by(60)) == {"h1", "h2", "h3"}  # Mongrel2 still reaches every host
