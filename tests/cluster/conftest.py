"""Fixtures of the multi-host tests: namespace hosts on a private bridge, and a fleet cluster on them.

Every test gets its own namespaces (a random per-run token in their names),
its own multicast group, cluster name and key. The teardown stops every fleet
process (TERM, then SIGKILL of its process group), Mongrel2, anything else
left in the namespaces, and deletes the namespaces, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import netns
from tests.support.netns import FleetCluster, Network  # noqa: E402

_REASON: list[str | None] = []


def _unavailable() -> str | None:
    if not _REASON:
        _REASON.append(netns.unavailable_reason())
    return _REASON[0]


def _network(hosts: int) -> Iterator[Network]:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    net = Network(hosts=hosts)
    net.create()
    try:
        yield net
    finally:
        problems = net.destroy()
        left = netns.leftover_namespaces(net.token)
    assert not problems and not left, f"cleanup: {problems}; namespaces left: {left}"


@pytest.fixture
def network() -> Iterator[Network]:
    yield from _network(3)


@pytest.fixture
def network4() -> Iterator[Network]:
    """Three hosts and one more (an attacker, an observer)."""
    yield from _network(4)


@pytest.fixture
def cluster(network: Network, tmp_path: Path) -> Iterator[FleetCluster]:
    """Nothing started yet: tests call start_all() or start the parts themselves."""
    fc = FleetCluster(network, tmp_path)
    problems: list[str] = []
    try:
        yield fc
    finally:
        problems = fc.close()
    assert not problems, "teardown:\n" + "\n".join(problems)
