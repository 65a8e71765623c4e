"""A hostile fourth host floods the cluster's multicast group while three hosts serve through Mongrel2.

tests/cluster/flood.py on h4 captures genuine datagrams, then sends a bounded
mix of garbage, truncated, oversized, replayed, wrong-key, unsigned and
out-of-window datagrams (see its docstring). What the victims accepted is
read from their own counters (`fleet stats`, "cluster"), not assumed. A short
flood here; bench/hostile.py runs the same scenario longer, for the figures.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.cluster.agent import REJECT_LOG_SOURCES
from fleet.cluster.protocol import MAX_DATAGRAM
from fleet.multicast import Channel, Group
from tests.support.netns import Network
from tests.support.scenario import FLOOD, HostilePlan, ServingCluster, run_hostile, udp_counters

SHORT = HostilePlan(baseline=5.0, flood_seconds=6.0, count=4000, capture=3.0, after=3.0)


def figure(record_property, name: str, value) -> None:
    print(f"\n[figure] {name} = {value}")
    record_property(name, value)


@pytest.fixture
def serving(network4: Network, tmp_path: Path) -> Iterator[ServingCluster]:
    cluster = ServingCluster(network4, tmp_path)
    problems: list[str] = []
    try:
        yield cluster
    finally:
        problems = cluster.close()
    assert not problems, "teardown:\n" + "\n".join(problems)


def test_oversized_datagrams_are_dropped_before_the_receive_buffer() -> None:
    """Regression: 64 KB datagrams filled the receive buffer and crowded out heartbeats.
    The socket filter drops them in the kernel: recvfrom never even sees a truncated one."""
    group = Group("239.255.91.17", 20000 + int(time.time() * 1000) % 9000)
    receiver, sender = Channel(group, "127.0.0.1"), Channel(group, "127.0.0.1")
    try:
        sizes = [MAX_DATAGRAM, MAX_DATAGRAM + 1, 60000, 100, 65000, 9000, 1]
        for size in sizes:
            sender.send(b"x" * size)
        got: list[int] = []
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            received = receiver.receive()
            if received is None:
                time.sleep(0.01)
            else:
                got.append(len(received[0]))
        time.sleep(0.2)
        while (received := receiver.receive()) is not None:
            got.append(len(received[0]))
    finally:
        receiver.close()
        sender.close()
    assert got == [MAX_DATAGRAM, 100, 1], got


@pytest.mark.slow
def test_a_flooding_host_gets_nothing_accepted_and_serving_goes_on(serving: ServingCluster, record_property) -> None:
    serving.start_all(processes=2)
    result = run_hostile(serving, serving.net.host(4), SHORT)
    flood, load = result["flood"], result["load"]
    figure(record_property, "flood_sent", flood["sent"])
    figure(record_property, "flood_by_mix", flood["by_mix"])
    figure(record_property, "victims", result["victims"])
    figure(record_property, "load", {k: load[k] for k in ("sent", "succeeded", "failed", "hung")})
    for window in ("baseline", "flood", "after"):
        figure(record_property, f"latency_{window}", result[f"latency_{window}"])
    figure(record_property, "heartbeat_gap_lines", result["heartbeat_gap_lines"])

    assert flood["sent"] == SHORT.count and not flood["send_errors"], flood
    assert flood["captured"] > 0, "nothing captured: the replays were garbage"
    for name, victim in result["victims"].items():
        assert victim["accepted_from_attacker"] == 0, (name, victim)
        # The counters are live: genuine peers are accepted, the flood is counted as dropped,
        # by the check that caught each mix.
        assert victim["accepted_genuine"] > 0, (name, victim)
        reasons = set(victim["rejected_by_reason"])
        # A replay of a datagram seen recently ends in the duplicate filter, an older one in the guard.
        assert {"Malformed", "BadSignature", "Unsigned", "Stale"} <= reasons, (name, victim)
        assert reasons & {"Replayed", "Duplicate"}, (name, victim)
        assert victim["other_cluster"] > 0, (name, victim)
    assert load["failed"] == 0 and load["hung"] == 0 and load["unfinished"] == 0, load
    assert result["generations"]["after"] == result["generations"]["before"], result["generations"]
    assert set(result["states_after"].values()) == {"ready"}, result["states_after"]


@pytest.mark.slow
def test_spoofed_sources_neither_flood_the_log_nor_its_memory(network: Network, tmp_path: Path,
                                                              record_property) -> None:
    """UDP sources are spoofable: 3,000 datagrams from 150 forged addresses give one log line
    for each of the first 32 sources and one saying the rest go unlogged (fleet.cluster.RejectLog)."""
    cluster = ServingCluster(network, tmp_path)
    try:
        cluster.start_mongrel2()
        cluster.start_master(processes=1)
        before = cluster.stats(1)["cluster"]
        udp_before = udp_counters(cluster.h1)
        attacker = network.host(3)
        done = attacker.exec(
            [sys.executable, str(FLOOD), "--group", cluster.group, "--iface", attacker.address,
             "--cluster", cluster.name, "--real-key-file", str(cluster.key), "--capture", "0.1",
             "--count", "3000", "--seconds", "3", "--mixes", "garbage,bad_mac,unsigned",
             "--spoof-sources", "150"], timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        sent = json.loads(done.stdout.splitlines()[-1])
        time.sleep(1.0)
        after = cluster.stats(1)["cluster"]
        kernel_drops = udp_counters(cluster.h1).get("RcvbufErrors", 0) - udp_before.get("RcvbufErrors", 0)
        log = cluster.master.log_text()
        cluster.get()  # still serving (it checks for a 200)
    finally:
        problems = cluster.close()
    assert not problems, problems
    counted = (after["rejected"] - before["rejected"]) + (after["other_cluster"] - before["other_cluster"])
    logged = re.findall(r"dropped a datagram from (\S+):", log)
    figure(record_property, "spoofed", {"sent": sent["sent"], "counted": counted, "kernel_drops": kernel_drops,
                                        "log_lines": len(logged), "sources_logged": len(set(logged))})
    assert sent["sent"] == 3000 and not sent["send_errors"], sent
    assert counted + kernel_drops == sent["sent"], (counted, kernel_drops, sent)
    assert not set(after["accepted_from"]) - set(before["accepted_from"]), after["accepted_from"]
    assert len(logged) == REJECT_LOG_SOURCES == len(set(logged)), logged
    assert all(source.startswith(attacker.address.rsplit(".", 1)[0] + ".1") for source in logged), logged
    assert log.count(f"from more than {REJECT_LOG_SOURCES} sources") == 1, log[-3000:]
