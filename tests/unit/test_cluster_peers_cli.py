"""The unicast cluster options: what they become, and one `fleet: error:` line for each mistake."""

from __future__ import annotations

import pytest

from fleet.cli import build_parser, main
from fleet.cluster.options import cluster_options
from fleet.multicast import Group


def options(*argv: str, role: str = "node"):
    return cluster_options(build_parser().parse_args(["node", *argv]), role)


def test_seeds_alone_make_a_unicast_cluster_on_the_first_seeds_port() -> None:
    made = options("--cluster-peers", "127.0.0.2:1800,127.0.0.3:1801", "--cluster-iface", "127.0.0.1")
    assert made.group is None
    assert made.peers == (("127.0.0.2", 1800), ("127.0.0.3", 1801))
    assert made.unicast_bind == ("127.0.0.1", 1800)
    # Commands run next to a daemon that holds the port: any free one.
    assert options("--cluster-peers", "127.0.0.2:1800", role="observer").unicast_bind[1] == 0


def test_with_a_group_the_unicast_port_is_the_groups_and_bind_wins(tmp_path) -> None:
    seeds = tmp_path / "seeds"
    seeds.write_text("# seeds\n127.0.0.2:1800\n127.0.0.3:1800  # two\n")
    made = options("--cluster", "239.255.1.1:1717", "--cluster-iface", "127.0.0.1",
                   "--cluster-peers", f"@{seeds}")
    assert made.group == Group("239.255.1.1", 1717) and made.unicast_bind == ("127.0.0.1", 1717)
    assert made.peers == (("127.0.0.2", 1800), ("127.0.0.3", 1800))
    made = options("--cluster-peers", "127.0.0.2:1800", "--cluster-bind", "127.0.0.1:1900")
    assert made.unicast_bind == ("127.0.0.1", 1900)
    assert options("--cluster", "239.255.1.1:1717", "--cluster-iface", "127.0.0.1").unicast_bind is None


@pytest.mark.parametrize("argv, says", [
    ([], "give --cluster GROUP:PORT (multicast), --cluster-peers"),
    (["--cluster-peers", "10.0.0.2"], "--cluster-peers '10.0.0.2': expected HOST:PORT"),
    (["--cluster-peers", "10.0.0.2:99999"], "out of range"),
    (["--cluster-peers", "239.1.1.1:1717"], "use --cluster"),
    (["--cluster-peers", "@/nonexistent/seeds"], "--cluster-peers @/nonexistent/seeds: No such file"),
    (["--cluster-peers", "127.0.0.2:1800", "--cluster-bind", "nope"], "--cluster-bind 'nope'"),
    (["--cluster-peers", "127.0.0.2:1800", "--cluster-bind", "192.0.2.1:1800"], "--cluster-bind 192.0.2.1:1800"),
])
def test_mistakes_are_one_line_and_exit_2(argv, says, capsys) -> None:
    assert main(["node", "--cluster-iface", "127.0.0.1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleet: error: ") and err.count("\n") == 1, err
    assert says in err, err
