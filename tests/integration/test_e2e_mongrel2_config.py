"""--mongrel2-config: fleet reads the handlers, chroot, temp_store and content_length from
Mongrel2's own config.sqlite (written by the real m2sh), and says where a flag differs."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from fleet.dev.mongrel2 import Mongrel2
from fleet.mongrel2.server_config import read_server_config
from tests.support.harness import APPS, Harness, fleet_cli, log_text, master_args, request, wait_for

OTHER_STORE = "/tmp/other.upload.XXXXXX"  # not fleet's default: a user who forgets to say it gets 400s


def config_args(m2: Mongrel2, *extra: str) -> list[str]:
    return ["--mongrel2-config", str(m2.workdir / "config.sqlite"), "--module", "apps:router",
            "--pythonpath", str(APPS), "-p", "1", "--threads", "2", "--graceful-timeout", "5", *extra]


def stored_uploads(m2: Mongrel2) -> list[Path]:
    return sorted((m2.chroot / "tmp").glob("other.upload.*"))


def test_the_config_alone_serves_every_route_and_its_uploads(harness: Harness) -> None:
    m2 = harness.mongrel2(upload_store=OTHER_STORE, content_length=10000)
    master = harness.master(config_args(m2))
    assert request(m2, "GET", "/t/hello").body == b"Hello world!"
    assert request(m2, "GET", "/j/hello").body == b"Hello world!"
    payload = os.urandom(200_000)  # over limits.content_length: Mongrel2 writes it to OTHER_STORE
    answer = request(m2, "POST", "/t/upload", body=payload, timeout=60)
    assert answer.status == 200, answer.body[:300]
    assert answer.json()["sha256"] == hashlib.sha256(payload).hexdigest()
    wait_for(lambda: stored_uploads(m2) == [], 10, what="the upload temp file to be removed")
    text = log_text(master)
    assert "differs" not in text and "refused upload" not in text


def test_a_route_chooses_one_handler(harness: Harness) -> None:
    m2 = harness.mongrel2()
    harness.master(config_args(m2, "--mongrel2-route", "/j/"))
    assert request(m2, "GET", "/j/hello").body == b"Hello world!"
    with pytest.raises(OSError):  # nobody serves /t/: Mongrel2 holds the request until our timeout
        request(m2, "GET", "/t/hello", timeout=1.5)


def test_a_flag_that_differs_wins_and_is_said_once(harness: Harness) -> None:
    m2 = harness.mongrel2(upload_store=OTHER_STORE)
    master = harness.master(config_args(m2, "--mongrel2-upload-store", "/tmp/mongrel2.upload.XXXXXX"))
    assert request(m2, "GET", "/t/hello").body == b"Hello world!"
    lines = [line for line in log_text(master).splitlines() if "differs" in line]
    assert len(lines) == 1, lines
    assert "--mongrel2-upload-store '/tmp/mongrel2.upload.XXXXXX' differs from upload.temp_store " \
           f"'{OTHER_STORE}'" in lines[0]


@pytest.mark.parametrize("extra, expected", [
    (["--mongrel2-server", "00000000-0000-0000-0000-000000000000"], "is not in"),
    (["--mongrel2-route", "/nowhere/"], "no handler route of that path"),
])
def test_config_mistakes_are_one_line(harness: Harness, extra: list[str], expected: str) -> None:
    m2 = harness.mongrel2()
    result = fleet_cli("master", *config_args(m2, *extra))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_a_missing_or_foreign_file_is_one_line(tmp_path: Path) -> None:
    for path, expected in [(tmp_path / "absent.sqlite", "no such file"), (Path(__file__), "not a Mongrel2 config")]:
        result = fleet_cli("master", "--mongrel2-config", str(path), "--module", "apps:router",
                           "--pythonpath", str(APPS))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr


def test_several_servers_need_a_choice(tmp_path: Path) -> None:
    (tmp_path / "m2.conf").write_text(
        'h = Handler(send_spec="tcp://127.0.0.1:19999", send_ident="a", recv_spec="tcp://*:19998", recv_ident="")\n'
        'one = Server(uuid="one-1", chroot="./", access_log="/a", error_log="/e", pid_file="/p", '
        'default_host="x", name="one", port=16001, hosts=[Host(name="x", routes={"/a/": h})])\n'
        'two = Server(uuid="two-2", chroot="./", access_log="/a", error_log="/e", pid_file="/p", '
        'default_host="x", name="two", port=16002, hosts=[Host(name="x", routes={"/b/": h})])\n'
        "servers = [one, two]\n")
    subprocess.run(["m2sh", "load", "-config", "m2.conf", "-db", "config.sqlite"], cwd=tmp_path, check=True,
                   capture_output=True)
    db = str(tmp_path / "config.sqlite")
    result = fleet_cli("master", "--mongrel2-config", db, "--module", "apps:router", "--pythonpath", str(APPS))
    assert result.returncode == 2 and "has 2 servers: choose one with --mongrel2-server (one-1, two-2)" \
        in result.stderr
    server = read_server_config(db, "two-2")
    assert [(r.path, r.endpoint.send_spec, r.endpoint.recv_spec) for r in server.routes] == \
        [("/b/", "tcp://127.0.0.1:19999", "tcp://127.0.0.1:19998")]  # a wildcard bind is reached on loopback
    assert server.chroot == str(tmp_path)


def test_a_node_serves_its_own_mongrel2_from_its_config(harness: Harness, cluster_args: list[str]) -> None:
    """Every host may run its own Mongrel2: a node's --mongrel2-config replaces the master's
    handlers, chroot, temp_store and content_length with its own, uploads included."""
    mine = harness.mongrel2([("/t/", "tnetstring")])
    harness.master(master_args(mine, processes=1, threads=1) + cluster_args + ["--node-name", "m"])
    theirs = harness.mongrel2(upload_store=OTHER_STORE, content_length=10000)
    node = harness.node(cluster_args + ["--node-name", "n", "--mongrel2-config", str(theirs.workdir / "config.sqlite")])
    assert request(theirs, "GET", "/t/hello").body == b"Hello world!"
    assert request(theirs, "GET", "/j/hello").body == b"Hello world!"
    payload = os.urandom(200_000)
    answer = request(theirs, "POST", "/t/upload", body=payload, timeout=60)
    assert answer.status == 200, answer.body[:300]
    assert answer.json()["sha256"] == hashlib.sha256(payload).hexdigest()
    wait_for(lambda: stored_uploads(theirs) == [], 10, what="the upload temp file to be removed")
    assert request(mine, "GET", "/t/hello").body == b"Hello world!"  # the master's own Mongrel2 still served
    text = log_text(node)
    assert "this host's Mongrel2" in text and "refused upload" not in text


def test_a_node_given_a_bad_config_says_so_in_one_line(tmp_path: Path, cluster_args: list[str]) -> None:
    result = fleet_cli("node", *cluster_args, "--mongrel2-config", str(tmp_path / "absent.sqlite"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such file" in lines[0], result.stderr
