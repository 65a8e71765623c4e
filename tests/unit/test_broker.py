"""The dispatcher's decisions, driven without sockets and with a fake clock."""

from __future__ import annotations

import pytest

from fleet.dispatch import broker as broker_module
from fleet.dispatch.broker import Assignment, BacklogFull, Broker, CreditLedger, Orphan


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def raw(conn: int, path: str = "/x", sender: bytes = b"m2") -> bytes:
    return b"%s %d %s 2:{},0:," % (sender, conn, path.encode())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broker(clock: FakeClock) -> Broker:
    return Broker(clock=clock)


def test_request_goes_only_to_a_thread_that_asked(broker: Broker) -> None:
    assert broker.request(0, b"m2", b"1", raw(1)) is None
    assert broker.backlog == 1
    assignments = broker.credit(b"10/0", 10, 2)
    assert assignments == [Assignment(b"10/0", 0, b"1", raw(1))]
    assert broker.holder_of(0, b"1") == b"10/0"


def test_idle_threads_are_preferred_over_ones_already_serving(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.credit(b"11/0", 11, 2)
    first = broker.request(0, b"m2", b"1", raw(1))
    second = broker.request(0, b"m2", b"2", raw(2))
    third = broker.request(0, b"m2", b"3", raw(3))
    assert [a.ident for a in (first, second, third)] == [b"10/0", b"11/0", b"10/0"]
    assert broker.request(0, b"m2", b"4", raw(4)).ident == b"11/0"
    # Both threads now hold what their credits allow: the next one waits.
    assert broker.request(0, b"m2", b"5", raw(5)) is None and broker.backlog == 1


def test_done_returns_the_credit_and_serves_the_backlog(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 1)
    broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"2", raw(2))
    assert broker.done(b"10/0", 0, b"1", credit=True) == [Assignment(b"10/0", 0, b"2", raw(2))]
    assert broker.counters[10].served == 1


def test_pipelined_requests_on_one_connection_are_served_in_order(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.credit(b"11/0", 11, 2)
    assert broker.request(0, b"m2", b"7", raw(7, "/first")).ident == b"10/0"
    # The second request of connection 7 must not overtake the first on another thread.
    assert broker.request(0, b"m2", b"7", raw(7, "/second")) is None
    assert broker.done(b"10/0", 0, b"7", credit=True) == [Assignment(b"11/0", 0, b"7", raw(7, "/second"))]


def test_same_connection_id_on_two_endpoints_is_two_connections(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    assert broker.request(0, b"a", b"1", raw(1)) is not None
    assert broker.request(1, b"b", b"1", raw(1, sender=b"b")) is not None


def test_a_retiring_thread_gets_nothing_more(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.request(0, b"m2", b"1", raw(1))
    broker.retire(b"10/0")
    assert broker.request(0, b"m2", b"2", raw(2)) is None
    assert broker.done(b"10/0", 0, b"1", credit=True) == []
    assert broker.credit(b"10/0", 10, 1) == []
    broker.credit(b"11/0", 11, 1)
    assert broker.backlog == 0 and broker.holder_of(0, b"2") == b"11/0"


def test_a_dead_worker_leaves_orphans_to_answer(clock: FakeClock) -> None:
    broker = Broker(clock, pack_within=0.0)  # no packing: each thread runs one
    broker.credit(b"10/0", 10, 2)
    broker.credit(b"10/1", 10, 2)
    broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"2", raw(2))
    broker.request(0, b"m2", b"2", raw(2, "/pipelined"))
    orphans = broker.worker_gone(10)
    assert sorted(orphans, key=lambda o: (o.conn_id, o.behind)) == [
        Orphan(0, b"m2", b"1", running=True), Orphan(0, b"m2", b"2", running=True),
        # Pipelined behind conn 2's request: it dies with the connection closed for that one.
        Orphan(0, b"m2", b"2", behind=True)]
    # Each carries its request, so that an upload file nobody will serve can be deleted.
    assert {o.raw for o in orphans} == {raw(1), raw(2), raw(2, "/pipelined")}
    assert broker.holder_of(0, b"1") is None and broker.threads == {}
    # Nothing of the dead worker's is handed out again.
    assert broker.request(0, b"m2", b"3", raw(3)) is None


def test_unreachable_thread_requeues_the_request_first(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    assignment = broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"2", raw(2))  # goes to 10/0 as well (spare)
    broker.unreachable(assignment)
    assert broker.holder_of(0, b"1") is None
    assignments = broker.credit(b"11/0", 11, 1)
    assert assignments == [Assignment(b"11/0", 0, b"1", raw(1))]


def test_backlog_is_bounded(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "MAX_BACKLOG", 2)
    broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"2", raw(2))
    with pytest.raises(BacklogFull) as full:
        broker.request(0, b"m2", b"3", raw(3))
    assert full.value.orphan == Orphan(0, b"m2", b"3")
    assert full.value.orphan.raw == raw(3)


def test_take_waiting_empties_backlog_and_parked(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 1)
    broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"1", raw(1, "/parked"))
    broker.request(0, b"m2", b"2", raw(2))
    assert sorted(o.conn_id for o in broker.take_waiting()) == [b"1", b"2"]
    assert broker.backlog == 0


def test_request_age_uses_the_clock(broker: Broker, clock: FakeClock) -> None:
    broker.credit(b"10/0", 10, 2)
    assert broker.oldest_request_age(10) is None
    broker.request(0, b"m2", b"1", raw(1))
    clock.now += 3.5
    assert broker.oldest_request_age(10) == pytest.approx(3.5)
    assert broker.busy_threads(10) == 1 and broker.in_flight == 1


def test_a_stuck_worker_gets_nothing_new_and_its_healthy_threads_are_waited_for(
        broker: Broker, clock: FakeClock) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.request(0, b"m2", b"1", raw(1))  # will be stuck
    clock.now += 5
    broker.credit(b"10/1", 10, 2)
    broker.request(0, b"m2", b"2", raw(2))  # healthy, still running
    broker.retire_worker(10)
    assert broker.request(0, b"m2", b"3", raw(3)) is None and broker.backlog == 1
    assert broker.busy_threads(10) == 2
    assert broker.busy_threads(10, stuck_after=4) == 1  # the stuck thread does not count
    broker.done(b"10/1", 0, b"2", credit=True)
    assert broker.busy_threads(10, stuck_after=4) == 0
    assert broker.backlog == 1  # a credit from a retired thread takes nothing


def test_credit_ledger_keeps_a_connection_balance_across_requests() -> None:
    ledger = CreditLedger()
    key = (0, b"5")
    ledger.granted(key, 10)  # credits for a connection without flow control: ignored
    assert ledger.get(key) is None
    ledger.opened(key, 102400)
    ledger.opened(key, 999)  # only the first request's grant counts
    ledger.spent(key, 50042, closed=False)
    ledger.granted(key, 50042)
    assert ledger.get(key) == 102400
    ledger.spent(key, 10, closed=True)
    assert ledger.get(key) is None


def test_a_late_credit_from_a_reaped_worker_is_ignored(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.worker_gone(10)
    # Its last CREDIT was still in the socket when it was reaped.
    assert broker.credit(b"10/1", 10, 2) == []
    assert broker.request(0, b"m2", b"1", raw(1)) is None and broker.backlog == 1
    broker.worker_started(10)  # the pid is reused by a new worker
    assert broker.credit(b"10/0", 10, 1) == [Assignment(b"10/0", 0, b"1", raw(1))]


def test_only_the_request_a_thread_was_running_counts_as_running(broker: Broker, clock: FakeClock) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"2", raw(2))
    clock.now += 60
    orphans = {o.conn_id: o for o in broker.worker_gone(10)}
    assert orphans[b"1"].running and not orphans[b"2"].running
    assert orphans[b"2"].age == pytest.approx(60)


# -- packing and giving back ------------------------------------------------------------------


def test_one_threaded_workers_are_served_as_before(broker: Broker) -> None:
    """Packing only saves waking a sibling: a worker of one thread has none."""
    broker.credit(b"10/0", 10, 4)
    broker.credit(b"11/0", 11, 4)
    idents = [broker.request(0, b"m2", b"%d" % conn, raw(conn)).ident for conn in range(1, 7)]
    assert idents == [b"10/0", b"11/0", b"10/0", b"11/0", b"10/0", b"11/0"]


def test_a_thread_serving_a_new_request_takes_the_next_before_an_idle_one_is_woken(
        broker: Broker, clock: FakeClock) -> None:
    for thread in range(3):
        broker.credit(b"10/%d" % thread, 10, 2)
    assert broker.request(0, b"m2", b"1", raw(1)).ident == b"10/0"
    assert broker.request(0, b"m2", b"2", raw(2)).ident == b"10/0", "packed behind a request just given"
    assert broker.request(0, b"m2", b"3", raw(3)).ident == b"10/1", "10/0 is full: an idle thread"
    clock.now += broker_module.PACK_WITHIN * 2
    assert broker.request(0, b"m2", b"4", raw(4)).ident == b"10/2", "10/1's request is no longer new"


def test_an_idle_worker_runs_in_parallel_before_a_busy_one_packs(broker: Broker) -> None:
    for pid in (10, 11):
        for thread in range(2):
            broker.credit(b"%d/%d" % (pid, thread), pid, 2)
    assert broker.request(0, b"m2", b"1", raw(1)).ident == b"10/0"
    assert broker.request(0, b"m2", b"2", raw(2)).ident == b"11/0", "another process: its own core"
    assert broker.request(0, b"m2", b"3", raw(3)).ident == b"11/0", "both busy: packed onto the newest"
    assert broker.request(0, b"m2", b"4", raw(4)).ident == b"10/0", "11/0 is full: the other one packs"
    assert broker.request(0, b"m2", b"5", raw(5)).ident == b"10/1", "all full: an idle thread after all"


def test_a_request_given_back_goes_to_another_thread_first_and_the_credit_comes_back(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"2", raw(2))  # packed behind 1
    broker.request(0, b"m2", b"3", raw(3))  # waits: no room anywhere
    assert broker.give_back(b"10/0", 0, b"2") == [], "nobody else to take it: it waits, first in line"
    assert broker.holder_of(0, b"2") is None and broker.backlog == 2
    assert broker.credit(b"10/1", 10, 1) == [Assignment(b"10/1", 0, b"2", raw(2))]
    # 10/0 gets its credit back with the DONE of the request it is stuck in, not before.
    assert (broker.threads[b"10/0"].credits, broker.threads[b"10/0"].owed) == (0, 1)
    assert broker.done(b"10/0", 0, b"1", credit=True) == [Assignment(b"10/0", 0, b"3", raw(3))]
    assert (broker.threads[b"10/0"].credits, broker.threads[b"10/0"].owed) == (1, 0)
    assert broker.counters[10].served == 1, "what was given back is not counted as served"


def test_give_back_does_not_hand_the_request_back_to_the_thread_stuck_ahead(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 3)
    broker.credit(b"11/0", 11, 1)
    broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"2", raw(2))  # 11/0: an idle worker first
    broker.request(0, b"m2", b"3", raw(3))  # 10/0 again: packed
    assert broker.give_back(b"10/0", 0, b"3") == [], "11/0 is full and 10/0 is stuck: it waits"
    assert broker.backlog == 1
    assert broker.done(b"11/0", 0, b"2", credit=True) == [Assignment(b"11/0", 0, b"3", raw(3))]


def test_give_back_of_what_a_thread_does_not_hold_changes_nothing(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.request(0, b"m2", b"1", raw(1))
    assert broker.give_back(b"10/0", 0, b"9") == []
    assert broker.give_back(b"99/0", 0, b"1") == []
    broker.stream(b"10/0", 0, b"1")
    assert broker.give_back(b"10/0", 0, b"1") == [], "a stream is under way, not waiting"
    assert broker.holder_of(0, b"1") == b"10/0" and broker.threads[b"10/0"].owed == 0


def test_a_retiring_thread_gives_back_without_getting_a_credit(broker: Broker) -> None:
    broker.credit(b"10/0", 10, 2)
    broker.request(0, b"m2", b"1", raw(1))
    broker.request(0, b"m2", b"2", raw(2))
    broker.retire(b"10/0")
    broker.credit(b"10/1", 10, 1)
    assert broker.give_back(b"10/0", 0, b"2") == [Assignment(b"10/1", 0, b"2", raw(2))]
    assert (broker.threads[b"10/0"].credits, broker.threads[b"10/0"].owed) == (0, 0)


def test_give_backs_within_a_second_pause_packing(broker: Broker, clock: FakeClock) -> None:
    """One give-back can be a thread that was only descheduled; PAUSE_AFTER within a second say
    the app blocks: idle threads first again, for PACK_PAUSE."""
    threads = [b"10/%d" % n for n in range(4)]
    for ident in threads:
        broker.credit(ident, 10, 8)

    def packed_pair(conn: int) -> tuple[bytes, bytes]:
        """Two new requests; the threads they went to (all threads idle before)."""
        first = broker.request(0, b"m2", b"%d" % conn, raw(conn)).ident
        return first, broker.request(0, b"m2", b"%d" % (conn + 1), raw(conn + 1)).ident

    def finish_all() -> None:
        for ident in threads:
            for index, conn_id in list(broker.threads[ident].held):
                broker.done(ident, index, conn_id, credit=True)

    conn = 0
    for given in range(1, broker_module.PAUSE_AFTER + 1):
        conn += 2
        first, second = packed_pair(conn)
        assert first == second, f"packed ({given - 1} give-backs so far)"
        broker.give_back(first, 0, b"%d" % (conn + 1))  # the second never started
        clock.now += 0.1
        finish_all()
    first, second = packed_pair(100)
    assert first != second, "paused: an idle thread is woken"
    finish_all()
    clock.now += broker_module.PACK_PAUSE
    first, second = packed_pair(200)
    assert first == second, "packing again"
