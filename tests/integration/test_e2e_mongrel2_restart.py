"""fleet speaks ZMTP to Mongrel2 itself (fleet.mongrel2.connection): a Mongrel2
that restarts must be reconnected to on both sides, requests and replies, with
no worker restarted and no request lost after it is back."""

from __future__ import annotations

import pytest

from tests.support.harness import Harness, master_args, request, worker_pids


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["broker", "direct"])
def test_fleet_serves_again_as_soon_as_mongrel2_is_back(harness: Harness, dispatch: str) -> None:
    m2 = harness.mongrel2()
    master = harness.master(master_args(m2, processes=2, threads=2, extra=["--dispatch", dispatch]))
    assert request(m2, "GET", "/t/hello").status == 200
    workers = worker_pids(master)

    for _ in range(2):
        m2.stop()
        m2.start()
        # Every request after the restart is answered: the first ones wait in
        # Mongrel2 until the dispatcher (or the threads) have reconnected, and
        # no reply goes to the connection of the Mongrel2 that is gone.
        for number in range(20):
            prefix = "/t/" if number % 2 else "/j/"
            answer = request(m2, "GET", f"{prefix}hello", timeout=10)
            assert answer.status == 200, answer.body

    assert worker_pids(master) == workers, "workers were restarted"
    assert "Traceback" not in master.stderr_text()
