"""Unicast peers: address parsing, the peer file, and the bounded, expiring peer table."""

from __future__ import annotations

import pytest

from fleet.cluster.peers import PeerError, PeerTable, parse_address, parse_peer_file, parse_peer_list


def no_dns(name: str) -> str:
    raise OSError(f"no such host {name}")


def test_addresses_parse_and_names_resolve_once() -> None:
    assert parse_address("10.0.0.2:1717") == ("10.0.0.2", 1717)
    assert parse_address(" seed.example:9 ", resolve=lambda name: "192.0.2.7") == ("192.0.2.7", 9)
    assert parse_peer_list("10.0.0.2:1717,10.0.0.3:1717,,10.0.0.2:1717") == [
        ("10.0.0.2", 1717), ("10.0.0.3", 1717)]  # duplicates and empty items dropped


@pytest.mark.parametrize("text, reason", [
    ("10.0.0.2", "expected HOST:PORT"),
    (":1717", "expected HOST:PORT"),
    ("10.0.0.2:http", "expected HOST:PORT"),
    ("10.0.0.2:0", "out of range"),
    ("10.0.0.2:70000", "out of range"),
    ("239.1.1.1:1717", "use --cluster"),
    ("0.0.0.0:1717", "not a host's address"),
    ("nowhere.invalid:1717", "cannot resolve"),
])
def test_bad_addresses_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(PeerError, match=reason) as caught:
        parse_peer_list(text, resolve=no_dns)
    assert "\n" not in str(caught.value) and "--cluster-peers" in str(caught.value)


def test_an_empty_list_is_refused() -> None:
    with pytest.raises(PeerError, match="no address"):
        parse_peer_list(" , ")


def test_a_peer_file_has_one_address_per_line_and_comments() -> None:
    text = "# the seeds\n10.0.0.2:1717\n\n  10.0.0.3:1717   # rack 2\n10.0.0.2:1717\n"
    assert parse_peer_file(text, "seeds.txt") == [("10.0.0.2", 1717), ("10.0.0.3", 1717)]
    with pytest.raises(PeerError, match=r"seeds.txt line 2: '10.0.0.4'"):
        parse_peer_file("10.0.0.2:1717\n10.0.0.4\n", "seeds.txt")
    with pytest.raises(PeerError, match="holds no address"):
        parse_peer_file("# nothing yet\n", "seeds.txt")


def test_seeds_stay_learned_peers_expire_unless_refreshed() -> None:
    table = PeerTable([("10.0.0.2", 1), ("10.0.0.3", 1)], None, expire_after=5.0)
    assert table.learn(("10.0.0.9", 1), now=100.0)
    assert table.learn(("10.0.0.2", 1), now=100.0)  # a seed: not added twice
    assert table.addresses() == [("10.0.0.2", 1), ("10.0.0.3", 1), ("10.0.0.9", 1)]
    table.learn(("10.0.0.8", 1), now=103.0)
    assert table.expire(104.0) == []
    table.learn(("10.0.0.9", 1), now=104.0)  # heard again: refreshed
    assert table.expire(108.5) == [("10.0.0.8", 1)]
    assert table.expire(109.5) == [("10.0.0.9", 1)]
    assert table.addresses() == [("10.0.0.2", 1), ("10.0.0.3", 1)]  # seeds never expire


def test_the_own_address_is_never_a_peer() -> None:
    # One seed list deployed everywhere names every host, this one included.
    table = PeerTable([("10.0.0.1", 1717), ("10.0.0.2", 1717)], None, expire_after=5.0)
    table.set_own(("10.0.0.1", 1717))
    assert table.addresses() == [("10.0.0.2", 1717)]
    assert table.learn(("10.0.0.1", 1717), 1.0) and table.addresses() == [("10.0.0.2", 1717)]


def test_the_table_refuses_to_grow_past_its_limit() -> None:
    table = PeerTable([("10.0.0.1", 1)], None, expire_after=5.0, max_peers=3)
    assert table.learn(("10.0.0.2", 1), 0.0) and table.learn(("10.0.0.3", 1), 0.0)
    assert not table.learn(("10.0.0.4", 1), 0.0)
    assert table.refused == 1 and len(table) == 3
    assert table.learn(("10.0.0.2", 1), 1.0)  # known peers are still refreshed
    table.expire(5.5)
    assert table.learn(("10.0.0.4", 1), 6.0)  # room again once a peer expired
    with pytest.raises(PeerError, match="more than 3"):
        PeerTable([("10.0.0.1", port) for port in range(1, 5)], None, 5.0, max_peers=3)
