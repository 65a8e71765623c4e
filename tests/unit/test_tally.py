"""What workers served, counted (fleet.worker.tally) and added up by the dispatcher's glue."""

from __future__ import annotations

import logging

import msgpack
import pytest

from fleet.config import Endpoint
from fleet.dispatch.dispatcher import Dispatcher
from fleet.worker.tally import LATENCY_BUCKETS, VECTOR_SIZE, Tally, Totals, figures, snapshot, valid_vector


def test_a_tally_counts_by_kind_status_class_and_latency() -> None:
    tally = Tally()
    tally.record("mongrel2", "200 OK", 0.0004)
    tally.record("mongrel2", "204 No Content", 0.002)
    tally.record("http", "404 Not Found", 0.3)
    tally.record("http", "500", 20.0)
    tally.record("http", None, 0.1)  # no status reached the client: not counted
    served = figures(snapshot([tally], log_lines_dropped=3))
    assert served["requests"] == {"mongrel2": {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 0, "5xx": 0},
                                  "http": {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 1, "5xx": 1}}
    buckets = served["latency_buckets"]
    assert len(buckets) == len(LATENCY_BUCKETS) + 1 and sum(buckets) == 4
    assert buckets[0] == 1  # 0.4 ms <= 1 ms
    assert buckets[LATENCY_BUCKETS.index(0.0025)] == 1
    assert buckets[LATENCY_BUCKETS.index(0.5)] == 1  # 0.3 s: in (0.25, 0.5]
    assert buckets[-1] == 1  # 20 s: beyond every bound
    assert served["latency_seconds"] == pytest.approx(20.3024)
    assert served["log_lines_dropped"] == 3


def test_a_snapshot_adds_every_thread() -> None:
    first, second = Tally(), Tally()
    first.record("mongrel2", "200 OK", 0.001)
    second.record("mongrel2", "302 Found", 0.001)
    second.record("mongrel2", "200 OK", 0.001)
    vector = snapshot([first, second], 0)
    assert valid_vector(vector) and len(vector) == VECTOR_SIZE
    assert figures(vector)["requests"]["mongrel2"] == {"1xx": 0, "2xx": 2, "3xx": 1, "4xx": 0, "5xx": 0}


def vector_of(requests: int, dropped: int = 0) -> list[float]:
    tally = Tally()
    for _ in range(requests):
        tally.record("http", "200 OK", 0.001)
    return snapshot([tally], dropped)


def test_totals_add_what_grew_and_keep_the_gone_workers() -> None:
    totals = Totals(remember=2)
    totals.update(10, vector_of(3))
    totals.update(11, vector_of(1))
    totals.update(10, vector_of(5))  # cumulative: 2 more
    assert totals.requests() == 6 and totals.requests(10) == 5 and totals.requests(11) == 1
    totals.gone(10)
    totals.update(10, vector_of(6))  # its last message, after it was reaped
    assert totals.requests() == 7
    totals.gone(11)
    totals.gone(12)  # 10 is forgotten now (remember=2); its requests stay in the total
    assert totals.requests(10) == 0 and totals.requests() == 7
    totals.started(11)  # a pid used again by a new worker: all of it is new
    totals.update(11, vector_of(1))
    assert totals.requests() == 8
    # The old worker 11 leaving the gone list must not take the new one's figures with it,
    # or the new one's next report would be counted again whole.
    totals.gone(13)
    totals.gone(14)
    totals.update(11, vector_of(2))
    assert totals.requests() == 9


@pytest.mark.parametrize("payload", [[1, 2], "x", [-1] * VECTOR_SIZE, [True] * VECTOR_SIZE, None])
def test_a_vector_not_as_a_worker_makes_it_is_invalid(payload) -> None:
    assert not valid_vector(payload)


@pytest.fixture
def dispatcher(tmp_path):
    glue = Dispatcher((Endpoint("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),), str(tmp_path / "link"),
                      pull_from_mongrel2=False)
    yield glue
    glue.close()


def test_the_dispatcher_adds_workers_figures_and_drops_bad_ones(dispatcher, caplog) -> None:
    dispatcher.on_figures(10, msgpack.packb(vector_of(4, dropped=2)))
    with caplog.at_level(logging.WARNING, logger="fleet.dispatcher"):
        dispatcher.on_figures(11, b"\xc1 not msgpack")
        dispatcher.on_figures(11, msgpack.packb([1, 2, 3]))
    assert [r.getMessage()[:40] for r in caplog.records] == ["dropped worker 11's figures: not what a "] * 2
    vector, answered = dispatcher.worker_figures()
    assert figures(vector)["requests"]["http"]["2xx"] == 4 and figures(vector)["log_lines_dropped"] == 2
    assert answered == {}
    assert dispatcher.answered(10) == 4 and dispatcher.answered() == 4


def test_the_dispatcher_counts_the_answers_it_gives_itself(dispatcher) -> None:
    dispatcher.answer([(0, b"S", b"3", 0.0, False, False, b"S 3 /t 2:{},0:,")], 503)
    dispatcher.answer([(0, b"S", b"4", 0.0, False, False, b"S 4 /t 2:{},0:,")] * 2, 503)
    assert dispatcher.worker_figures()[1] == {503: 3}
