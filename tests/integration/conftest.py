"""Fixtures for the integration tests: real Mongrel2 servers and real `fleet master` processes.

All processes are stopped in fixture teardowns, also when a test fails; a
harness teardown fails if a master leaves any process of its group behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.cluster.protocol import keygen
from fleet.dev.mongrel2 import Mongrel2, free_port
from tests.support.harness import FleetMaster, Harness, master_args


def _harness(basedir: Path) -> Iterator[Harness]:
    h = Harness(basedir)
    try:
        yield h
    finally:
        problems = h.close()
    assert not problems, "orphaned processes:\n" + "\n".join(problems)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Per-test Mongrel2 servers and masters, all stopped at the end of the test."""
    yield from _harness(tmp_path)


@pytest.fixture(scope="module")
def module_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    yield from _harness(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def m2(module_harness: Harness) -> Mongrel2:
    """A Mongrel2 with /t/ (tnetstring) and /j/ (json), each its own handler."""
    return module_harness.mongrel2()


@pytest.fixture(scope="module")
def master(module_harness: Harness, m2: Mongrel2) -> FleetMaster:
    """`fleet master -p 2 --threads 4` serving apps:router for both routes of `m2`."""
    return module_harness.master(master_args(m2))


@pytest.fixture(params=["/t/", "/j/"], ids=["tnetstring", "json"])
def prefix(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cluster_args(tmp_path: Path) -> list[str]:
    """A cluster of this test's own (group, port, name, key), on loopback only (TTL 1)."""
    key = tmp_path / "cluster.key"
    key.write_text(keygen())
    key.chmod(0o600)
    return ["--cluster", f"239.255.90.{free_port() % 250 + 1}:{free_port()}", "--cluster-iface", "127.0.0.1",
            "--cluster-key-file", str(key), "--cluster-name", f"t{free_port()}"]
