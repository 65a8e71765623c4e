"""A master and two bare nodes on one machine, clustered over loopback multicast.

Every process joins and sends on 127.0.0.1 (--cluster-iface), TTL 1: nothing
leaves the machine. Each test has its own group port, cluster name and key,
so tests cannot hear each other.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from fleet.cluster.protocol import keygen
from tests.support.harness import FleetMaster, Harness, fleet_cli, is_worker, master_args, request, wait_for


def status(cluster_args: list[str]) -> dict:
    out = fleet_cli("status", *cluster_args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def answering_pids(server, count: int) -> Counter:
    return Counter(request(server, "GET", "/t/echo").json()["pid"] for _ in range(count))


def family(*processes: FleetMaster) -> dict[int, str]:
    """worker pid -> which host process it belongs to."""
    return {child.pid: name for name, proc in zip("abcdefg", processes) for child in proc.descendants()
            if is_worker(child)}


@pytest.mark.slow
def test_bare_nodes_serve_the_masters_configuration(harness: Harness, cluster_args: list[str]) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=1, threads=2) + cluster_args + ["--node-name", "m"])
    nodes = [harness.node(cluster_args + ["--node-name", f"n{i}"]) for i in (1, 2)]
    owners = family(master, *nodes)
    served = answering_pids(server, 60)
    assert {owners.get(pid) for pid in served} == {"a", "b", "c"}, (served, owners)

    hosts = wait_for(lambda: (s := status(cluster_args)["hosts"]) and len(s) == 3 and s, 20,
                     what="three hosts in fleet status")
    assert sorted(h["hostname"] for h in hosts) == ["m", "n1", "n2"]
    assert sorted(h["role"] for h in hosts) == ["master", "node", "node"]
    assert {h["state"] for h in hosts} == {"ready"}
    assert all(h["workers_ready"] == h["workers_total"] == 1 for h in hosts)
    before = {h["generation"] for h in hosts}
    assert len(before) == 1

    out = fleet_cli("reload", *cluster_args, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    after = {h["hostname"]: h["generation"] for h in status(cluster_args)["hosts"]}
    assert set(after.values()) == {before.pop() + 1}, after
    # Every host's workers were replaced, and all of them serve again.
    new_owners = family(master, *nodes)
    assert not set(new_owners) & set(owners)
    assert {new_owners.get(pid) for pid in answering_pids(server, 60)} == {"a", "b", "c"}


def test_a_node_with_the_wrong_key_never_joins(harness: Harness, cluster_args: list[str], tmp_path: Path) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    harness.master(master_args(server, processes=1, threads=1) + cluster_args)
    wrong = tmp_path / "wrong.key"
    wrong.write_text(keygen())
    args = list(cluster_args)
    args[args.index("--cluster-key-file") + 1] = str(wrong)
    node = harness.node(args + ["--node-name", "intruder"], ready=False)
    time.sleep(3)
    assert "node ready" not in node.stderr_text()
    assert not node.descendants(), "a node with the wrong key started workers"
    assert [h["hostname"] for h in status(cluster_args)["hosts"]] != ["intruder"]
    assert "intruder" not in {h["hostname"] for h in status(cluster_args)["hosts"]}

    # Given the cluster's key and a HUP (as `systemctl reload` sends), it joins without a restart.
    wrong.write_text(Path(cluster_args[cluster_args.index("--cluster-key-file") + 1]).read_text())
    node.proc.send_signal(signal.SIGHUP)
    node.wait_ready()
    assert "HUP: reading the key file again" in node.stderr_text()
    assert node.proc.poll() is None and node.descendants()


def test_a_waiting_node_stops_cleanly_on_term(harness: Harness, cluster_args: list[str]) -> None:
    """No master yet: no supervisor either, and TERM still ends the node cleanly."""
    node = harness.node(cluster_args + ["--node-name", "early"], ready=False)
    wait_for(lambda: "asking cluster" in node.stderr_text(), 10, what="the node waiting")
    node.proc.send_signal(signal.SIGTERM)
    assert node.wait_exit() == 0, node.stderr_text()
    assert "SIGTERM while waiting for a configuration; stopped" in node.stderr_text()


def test_fleet_log_reaches_every_host(harness: Harness, cluster_args: list[str]) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=1, threads=1) + cluster_args)
    node = harness.node(cluster_args + ["--node-name", "n1"])
    assert fleet_cli("log", *cluster_args, "hello from the test").returncode == 0
    for proc in (master, node):
        wait_for(lambda proc=proc: "hello from the test" in proc.stderr_text(), 10, what="the log line")


def test_keygen_makes_a_key_the_cluster_accepts(tmp_path: Path) -> None:
    out = fleet_cli("keygen")
    assert out.returncode == 0 and len(out.stdout.strip()) == 44
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    out = fleet_cli("status", "--cluster", "239.255.90.1:17999", "--cluster-iface", "127.0.0.1",
                    "--cluster-key-file", str(bad))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "fleet: error:" in out.stderr


def test_two_masters_with_different_configurations_are_reported(harness: Harness, cluster_args: list[str]) -> None:
    server = harness.mongrel2([("/t/", "tnetstring")])
    one = harness.master(master_args(server, processes=1, threads=1) + cluster_args + ["--node-name", "m1"])
    two = harness.master(master_args(server, processes=2, threads=1) + cluster_args + ["--node-name", "m2"])
    for master in (one, two):
        wait_for(lambda master=master: "CONFLICT" in master.stderr_text(), 15,
                 what="a configuration conflict in the log")
    assert "processes" in one.stderr_text().split("CONFLICT", 1)[1].splitlines()[0]


def test_a_node_that_cannot_import_the_app_reports_it(harness: Harness, cluster_args: list[str],
                                                      tmp_path: Path) -> None:
    """The app imports on the master but not on this node: the node says so in
    its heartbeat (fleet status shows it) instead of crash-looping."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "picky.py").write_text(
        "import os\n"
        "__version__ = '1.2.3'\n"
        "if os.environ.get('PICKY_BROKEN'):\n"
        "    raise RuntimeError('this host lacks a dependency')\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'picky']\n")
    server = harness.mongrel2([("/t/", "tnetstring")])
    args = master_args(server, module="picky", processes=1, threads=1)
    args[args.index("--pythonpath") + 1] = str(app_dir)
    harness.master(args + cluster_args + ["--node-name", "m"])
    import os

    os.environ["PICKY_BROKEN"] = "1"
    try:
        node = harness.node(cluster_args + ["--node-name", "broken"], ready=False)
    finally:
        del os.environ["PICKY_BROKEN"]

    def broken_row():
        rows = {h["hostname"]: h for h in status(cluster_args)["hosts"]}
        return rows.get("broken") if rows.get("broken", {}).get("error") else None

    row = wait_for(broken_row, 30, what="the node's error in fleet status")
    assert row["state"] == "degraded" and "this host lacks a dependency" in row["error"]
    assert not node.descendants() or all("fleet.worker" not in " ".join(p.cmdline()) for p in node.descendants())
    master_row = next(h for h in status(cluster_args)["hosts"] if h["hostname"] == "m")
    assert master_row["app_version"] == "1.2.3"
    assert request(server, "GET", "/t/").body == b"picky"


def test_fleet_status_asks_and_every_host_answers_at_once(harness: Harness, cluster_args: list[str]) -> None:
    """Heartbeats 20 s apart: listening for 2.5 of them (the old way) would outlast
    fleet_cli's 30 s; asked, the master and both nodes answer at once."""
    slow = cluster_args + ["--cluster-heartbeat", "20"]
    server = harness.mongrel2([("/t/", "tnetstring")])
    harness.master(master_args(server, processes=1, threads=1) + slow + ["--node-name", "m"])
    for name in ("n1", "n2"):
        harness.node(slow + ["--node-name", name])

    def everyone() -> list[dict]:
        out = fleet_cli("status", *slow, "--json", timeout=30)
        assert out.returncode == 0, out.stderr
        hosts = json.loads(out.stdout)["hosts"]
        return hosts if sorted(h["hostname"] for h in hosts) == ["m", "n1", "n2"] else []

    hosts = wait_for(everyone, 60, what="fleet status to list all three hosts")
    assert all(h["state"] == "ready" and h.get("reported_by") != "master" for h in hosts), hosts


def test_a_node_refuses_what_its_policy_does_not_allow(harness: Harness, cluster_args: list[str]) -> None:
    """First join: a module outside the policy runs nothing and says why. Later: a
    configuration over the node's limit is refused and the node keeps serving the old."""
    server = harness.mongrel2([("/t/", "tnetstring")])
    master = harness.master(master_args(server, processes=1, threads=1) + cluster_args + ["--node-name", "m"])
    strict = harness.node(cluster_args + ["--node-name", "strict", "--allow-module", "shop.*"], ready=False)
    limited = harness.node(cluster_args + ["--node-name", "limited", "--allow-module", "apps:*",
                                           "--max-processes", "1"])

    def host(name: str) -> dict:
        return next((h for h in status(cluster_args)["hosts"] if h["hostname"] == name), {})

    refused = wait_for(lambda: (h := host("strict")).get("error") and h, 30, what="the strict node to say why")
    assert refused["error"].startswith("refused: module 'apps:router' is not allowed here"), refused
    assert refused["workers_total"] == 0 and not strict.descendants()
    assert strict.stderr_text().count("is not allowed here") == 1  # said once, though announced every second

    before = host("limited")
    assert before["state"] == "ready" and before["workers_ready"] == 1
    workers = {child.pid for child in limited.descendants()}
    master.stop()
    harness.master(master_args(server, processes=2, threads=1) + cluster_args + ["--node-name", "m"])
    after = wait_for(lambda: (h := host("limited")).get("error") and h, 30, what="the limited node to refuse")
    assert after["error"].startswith("refused: 2 processes is over this node's limit of 1"), after
    # Still serving its generation with its workers, and flagged: it does not run what the master announces.
    assert after["state"] == "degraded" and after["workers_ready"] == 1
    assert after["generation"] == before["generation"]
    assert {child.pid for child in limited.descendants()} == workers  # the same workers serve on
