"""Pacing and flow control towards Mongrel2: the pure arithmetic (fleet.mongrel2.pacing),
then Reply driven by a fake clock and a fake responder (no socket, no sleep that matters)."""

from __future__ import annotations

import pytest

from fleet.mongrel2 import reply as reply_module
from fleet.mongrel2.codec import Credits, Disconnect
from fleet.mongrel2.pacing import BURST_MESSAGES, MAX_BUFFERED, PACE_INTERVAL, CreditWindow, Pacer
from fleet.mongrel2.reply import Reply
from fleet.wsgi.serve import ClientGone

SENDER, CONN = b"54c6755b-9628-40a4-9a2d-cc82a816345e", b"7"


def test_the_pacer_allows_a_burst_then_one_message_per_interval() -> None:
    pacer = Pacer(now=0.0)
    assert all(pacer.take(0.0) for _ in range(BURST_MESSAGES))
    assert not pacer.take(0.0)
    assert not pacer.take(PACE_INTERVAL / 2)
    assert pacer.take(PACE_INTERVAL)
    assert not pacer.take(PACE_INTERVAL)


def test_the_pacer_refills_no_further_than_the_burst() -> None:
    pacer = Pacer(now=0.0)
    for _ in range(BURST_MESSAGES):
        pacer.take(0.0)
    assert pacer.refill(3600.0) == BURST_MESSAGES


def test_buffered_data_waits_for_a_token_unless_there_is_a_lot_of_it() -> None:
    pacer = Pacer(now=0.0)
    for _ in range(BURST_MESSAGES):
        pacer.take(0.0)
    assert not pacer.may_flush(0.0, 10)
    assert pacer.may_flush(0.0, MAX_BUFFERED)
    assert pacer.may_flush(PACE_INTERVAL, 10)


def test_the_credit_window_gives_at_most_its_balance() -> None:
    window = CreditWindow(100)
    assert window.take(60) == 60 and window.take(60) == 40
    assert not window.open and window.take(10) == 0
    window.grant(5)
    assert window.open and window.take(10) == 5


class FakeResponder:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.sent.append(message)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()

    def sleep(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(reply_module.time, "sleep", sleep)
    return clock


def bodies(responder: FakeResponder) -> list[bytes]:
    return [message.split(b", ", 1)[1] for message in responder.sent]


def test_a_fast_stream_is_coalesced_after_the_burst(clock: FakeClock) -> None:
    responder = FakeResponder()
    reply = Reply(responder, SENDER, CONN, clock=clock)
    for _ in range(100):
        reply.send(b"x")  # no time passes: only the burst leaves one by one
    reply.finish()
    assert bodies(responder) == [b"x"] * BURST_MESSAGES + [b"x" * (100 - BURST_MESSAGES)]
    assert reply.bytes_sent == 100 and reply.messages_sent == BURST_MESSAGES + 1


def test_the_close_waits_for_its_token_too(clock: FakeClock) -> None:
    responder = FakeResponder()
    reply = Reply(responder, SENDER, CONN, clock=clock)
    for _ in range(BURST_MESSAGES):
        reply.send(b"y")
    reply.finish(close=True)
    assert bodies(responder)[-1] == b"" and clock.now >= PACE_INTERVAL


def test_flow_control_sends_exactly_what_the_credits_allow(clock: FakeClock) -> None:
    responder = FakeResponder()
    grants = [[Credits(SENDER, CONN, 3)], [Credits(SENDER, CONN, 10)]]
    reply = Reply(responder, SENDER, CONN, credits=4, clock=clock,
                  poll_control=lambda timeout: grants.pop(0) if grants else [])
    reply.finish(b"0123456789")
    assert bodies(responder) == [b"0123", b"456", b"789"]
    assert reply.credits.balance == 7


def test_a_disconnect_while_streaming_stops_the_response(clock: FakeClock) -> None:
    responder = FakeResponder()
    events = [[], [Disconnect(SENDER, CONN)]]
    reply = Reply(responder, SENDER, CONN, clock=clock, poll_control=lambda timeout: events.pop(0))
    reply.send(b"first")
    reply.send(b"second")
    with pytest.raises(ClientGone):
        reply.send(b"third")
    assert bodies(responder) == [b"first", b"second"]


def test_a_response_waiting_for_credits_gives_up_after_the_credit_wait(clock: FakeClock) -> None:
    responder = FakeResponder()

    def poll(timeout: float) -> list:
        clock.now += timeout
        return []

    reply = Reply(responder, SENDER, CONN, credits=0, clock=clock, poll_control=poll)
    with pytest.raises(ClientGone):
        reply.finish(b"never")
    assert responder.sent == [] and clock.now >= reply_module.CREDIT_WAIT
