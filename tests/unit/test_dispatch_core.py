"""The dispatcher's core, both of them: fleet/dispatch/core.py (the reference) and
its compiled twin fleet/dispatch/_core.c. Each test runs against both; the last
one feeds both the same random history and compares everything they did.

The core runs in the test's own thread here (run_once), with real sockets: a
socketpair stands for an open Mongrel2 connection (ZMTP frames), real
ThreadLinks for the worker threads.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
import tnetstring

from fleet import native
from fleet.dispatch import core as pure_core
from fleet.dispatch import frames as wire
from fleet.dispatch.broker import (
    CLOSED_MEMORY,
    MAX_BACKLOG,
    MAX_CLOSED,
    MAX_GONE_PIDS,
    PACK_PAUSE,
    PACK_WITHIN,
    PAUSE_AFTER,
)
from fleet.dispatch.link import ThreadLink
from fleet.mongrel2 import zmtp
from fleet.mongrel2.codec import Credits, Disconnect, parse_message


def compiled_core():
    if native.PURE:
        pytest.skip("FLEET_PURE is set: the compiled core is not used")
    module = native.compiled("fleet.dispatch._core")
    assert module is not None, "fleet.dispatch._core was not built (pip install -e . builds it)"
    return module.Core


@pytest.fixture(params=["pure", "compiled"])
def core_class(request):
    return pure_core.Core if request.param == "pure" else compiled_core()


class Glue:
    """Records what the core asks of its glue."""

    def __init__(self) -> None:
        self.ready: list = []
        self.figures: list = []
        self.rejected: list = []
        self.unknown: list = []
        self.answered: list = []
        self.lost: list = []
        self.fds: list = []

    def on_tick(self, now: float) -> None:
        pass

    def on_fd(self, fd: int) -> None:
        self.fds.append(fd)

    def on_lost(self, index: int) -> None:
        self.lost.append(index)

    def on_ready(self, pid: int, version: str | None) -> None:
        self.ready.append((pid, version))

    def on_figures(self, pid: int, payload: bytes) -> None:
        self.figures.append((pid, payload))

    def on_rejected(self, index: int, raw: bytes, reason: str) -> None:
        self.rejected.append((index, raw))

    def on_unknown(self, ident: bytes, kind: bytes) -> None:
        self.unknown.append((ident, kind))

    def answer(self, orphans: list, status: int) -> None:
        self.answered.append((status, [tuple(o) for o in orphans]))

    def dropped(self, orphans: list) -> None:
        self.answered.append(("dropped", [tuple(o) for o in orphans]))

    def request_credits(self, index: int, raw: bytes) -> int | None:
        return parse_message(raw).download_credits

    def control_event(self, index: int, raw: bytes):
        event = parse_message(raw)
        if isinstance(event, Credits):
            return ("credits", event.credits)
        if isinstance(event, Disconnect):
            return ("disconnect",)
        return ("other",)


def req(conn: int, path: str = "/x", sender: bytes = b"S", credits: int | None = None) -> bytes:
    headers = {b"METHOD": b"GET"}
    if credits is not None:
        headers[b"DOWNLOAD_CREDITS"] = b"%d" % credits
    return b"%s %d %s %s0:," % (sender, conn, path.encode(), tnetstring.dumps(headers))


def control(conn: int, body: bytes, credits: int | None = None) -> bytes:
    headers = {b"METHOD": b"JSON"}
    if credits is not None:
        headers[b"DOWNLOAD_CREDITS"] = b"%d" % credits
    return b"S %d @* %s%d:%s," % (conn, tnetstring.dumps(headers), len(body), body)


class Rig:
    def __init__(self, core_class, tmp_path: Path, endpoints: int = 1, pack_within: float | None = None,
                 pack_pause: float | None = None) -> None:
        self.path = str(tmp_path / "link")
        self.glue = Glue()
        extra = {} if pack_within is None else {"pack_within": pack_within}
        if pack_pause is not None:
            extra["pack_pause"] = pack_pause
        self.core = core_class(self.path, endpoints, self.glue, **extra)
        self.mongrel2: list[socket.socket] = []
        for index in range(endpoints):
            ours, theirs = socket.socketpair()
            self.core.attach(index, theirs.detach(), b"")
            self.mongrel2.append(ours)
        self.links: dict[bytes, ThreadLink] = {}

    def settle(self) -> None:
        """Let the core handle everything written so far."""
        idle = 0
        while idle < 3:
            idle = idle + 1 if self.core.run_once(0.0) == 0 else 0

    def push(self, *messages: bytes, index: int = 0) -> None:
        data = memoryview(b"".join(zmtp.frame(m) for m in messages))
        sock = self.mongrel2[index]
        while data:  # what fits, then let the core read it: both run on this thread
            try:
                data = data[sock.send(data, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                pass
            self.settle()

    def thread(self, ident: bytes, credits: int = 1) -> ThreadLink:
        link = ThreadLink(self.path, ident, timeout=0.01)
        self.links[ident] = link
        if credits:
            link.send([wire.CREDIT, b"%d" % credits])
        self.settle()
        return link

    def send(self, ident: bytes, frames: list[bytes]) -> None:
        self.links[ident].send(frames)
        self.settle()

    def done(self, ident: bytes, conn: int, index: int = 0, last: bool = False, report: bytes | None = None) -> None:
        frames = [wire.tagged(wire.DONE_LAST if last else wire.DONE, index), b"%d" % conn]
        if report is not None:
            frames.append(report)
        self.send(ident, frames)

    def got(self, ident: bytes) -> list[list[bytes]]:
        link, messages = self.links[ident], []
        while link.poll(0):  # everything already sent has arrived: both ends are on this thread
            messages.append(link.take())
        return messages

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.core.close()
        for sock in self.mongrel2:
            sock.close()


@pytest.fixture
def rig(core_class, tmp_path):
    made = Rig(core_class, tmp_path)
    yield made
    made.close()


def test_the_limits_are_the_references(core_class) -> None:
    if core_class is not pure_core.Core:
        module = native.compiled("fleet.dispatch._core")
        assert (module.MAX_BACKLOG, module.MAX_GONE_PIDS, module.MAX_CLOSED, module.CLOSED_MEMORY) == \
            (MAX_BACKLOG, MAX_GONE_PIDS, MAX_CLOSED, CLOSED_MEMORY)
        assert (module.PACK_WITHIN, module.PACK_PAUSE, module.PAUSE_AFTER) == (PACK_WITHIN, PACK_PAUSE, PAUSE_AFTER)


def test_a_request_goes_to_a_thread_that_asked_and_its_done_counts(rig) -> None:
    rig.thread(b"100/0")
    rig.push(req(1))
    assert rig.got(b"100/0") == [[b"Q\x00", req(1)]]
    assert rig.core.served(100) == 0 and rig.core.busy_threads(100) == 1
    rig.done(b"100/0", 1)
    assert rig.core.served(100) == 1 and rig.core.total_served() == 1 and rig.core.busy_threads(100) == 0
    assert rig.core.served(999) is None


def test_without_credits_requests_wait_and_a_credit_drains_them_in_order(rig) -> None:
    rig.push(req(1), req(2))
    assert rig.core.backlog == 2
    rig.thread(b"100/0", credits=2)
    assert rig.got(b"100/0") == [[b"Q\x00", req(1)], [b"Q\x00", req(2)]]
    assert rig.core.backlog == 0


def test_idle_threads_first_then_one_behind_the_running_request(rig) -> None:
    rig.thread(b"100/0", credits=2)
    rig.thread(b"101/0", credits=2)
    rig.push(req(1), req(2), req(3))
    assert [m[1] for m in rig.got(b"100/0")] == [req(1), req(3)]
    assert [m[1] for m in rig.got(b"101/0")] == [req(2)]


def test_a_thread_serving_a_new_request_gets_the_next_before_its_idle_sibling(rig) -> None:
    rig.thread(b"100/0", credits=2)
    rig.thread(b"100/1", credits=2)
    rig.thread(b"101/0", credits=2)
    rig.push(req(1), req(2), req(3), req(4))
    # 1 to 100/0; 2 to the idle worker 101 (its own core); 3 packed behind 1 rather than waking 100/1;
    # 4: 100/0 is full and 101 has no idle thread to spare, so the idle 100/1 after all.
    assert [m[1] for m in rig.got(b"100/0")] == [req(1), req(3)]
    assert [m[1] for m in rig.got(b"101/0")] == [req(2)]
    assert [m[1] for m in rig.got(b"100/1")] == [req(4)]


def test_a_request_given_back_goes_to_another_thread_and_the_credit_comes_with_the_done(core_class, tmp_path) -> None:
    rig = Rig(core_class, tmp_path, pack_within=1e9)  # always packs: the order does not hang on timing
    try:
        rig.thread(b"100/0", credits=2)
        rig.push(req(1), req(2), req(3))
        assert [m[1] for m in rig.got(b"100/0")] == [req(1), req(2)]
        rig.send(b"100/0", [wire.tagged(wire.GIVE_BACK, 0), b"2"])  # stuck in 1, 2 never started
        assert rig.core.backlog == 2, "nobody else to take it: it waits, first in line"
        rig.thread(b"100/1", credits=1)
        assert [m[1] for m in rig.got(b"100/1")] == [req(2)]
        assert rig.got(b"100/0") == [], "no credit back before the request it is stuck in is done"
        rig.done(b"100/0", 1)
        assert [m[1] for m in rig.got(b"100/0")] == [req(3)]
        rig.done(b"100/1", 2)
        rig.done(b"100/0", 3)
        assert rig.core.total_served() == 3 and rig.core.backlog == 0
        rig.send(b"100/0", [wire.tagged(wire.GIVE_BACK, 0), b"3"])  # not held any more: nothing happens
        assert rig.core.backlog == 0 and rig.glue.unknown == []
    finally:
        rig.close()


def test_pipelined_requests_wait_for_the_one_ahead(rig) -> None:
    rig.thread(b"100/0", credits=4)
    rig.thread(b"101/0", credits=4)
    rig.push(req(7, "/a"), req(7, "/b"))
    assert [m[1] for m in rig.got(b"100/0")] == [req(7, "/a")]
    assert rig.got(b"101/0") == []
    rig.done(b"100/0", 7)
    assert [m[1] for m in rig.got(b"101/0")] == [req(7, "/b")]  # the idle thread comes first


def test_a_dead_worker_leaves_orphans_running_queued_and_behind(rig) -> None:
    rig.thread(b"100/0", credits=2)
    rig.thread(b"101/0", credits=0)
    rig.push(req(1, "/run"), req(2, "/queued"), req(1, "/piped"))
    orphans = rig.core.worker_gone(100)
    assert [(o[2], o[4], o[5], o[6]) for o in orphans] == [
        (b"1", True, False, req(1, "/run")),
        (b"1", False, True, req(1, "/piped")),
        (b"2", False, False, req(2, "/queued")),
    ]
    assert all(o[0] == 0 and o[1] == b"S" for o in orphans)
    rig.send(b"101/0", [wire.CREDIT, b"1"])
    rig.push(req(1, "/again"))  # nobody holds connection 1 any more
    assert [m[1] for m in rig.got(b"101/0")] == [req(1, "/again")]


def test_a_late_credit_of_a_reaped_worker_is_ignored_until_its_pid_is_reused(rig) -> None:
    rig.thread(b"100/0", credits=1)
    rig.core.worker_gone(100)
    rig.send(b"100/0", [wire.CREDIT, b"1"])
    rig.push(req(1))
    assert rig.got(b"100/0") == [] and rig.core.backlog == 1
    rig.core.worker_started(100)
    rig.send(b"100/0", [wire.CREDIT, b"1"])
    assert [m[1] for m in rig.got(b"100/0")] == [req(1)]


def test_a_retiring_thread_gets_nothing_more(rig) -> None:
    rig.thread(b"100/0", credits=2)
    rig.push(req(1))
    rig.send(b"100/0", [wire.RETIRE])
    rig.push(req(2))
    assert rig.got(b"100/0") == [[b"Q\x00", req(1)], [wire.RETIRED]]
    rig.done(b"100/0", 1, last=True)
    assert rig.core.backlog == 1 and rig.core.served(100) == 1


def test_a_closed_link_retires_its_thread(rig) -> None:
    rig.thread(b"100/0", credits=2)
    rig.thread(b"101/0", credits=2)
    rig.links.pop(b"100/0").close()
    rig.settle()
    rig.push(req(1), req(2))
    assert [m[1] for m in rig.got(b"101/0")] == [req(1), req(2)]


def test_retire_worker_and_the_ages(rig) -> None:
    rig.thread(b"100/0", credits=2)
    rig.thread(b"100/1", credits=2)
    assert rig.core.oldest_request_age(100) is None
    rig.push(req(1))
    assert rig.core.busy_threads(100) == 1
    assert 0 <= rig.core.oldest_request_age(100) < 5
    assert rig.core.busy_threads(100, 0.0) == 0  # everything counts as stuck after 0 s
    rig.core.retire_worker(100)
    rig.push(req(2))
    assert rig.core.backlog == 1


def test_shutting_down_answers_what_waits_and_what_comes(rig) -> None:
    rig.thread(b"100/0", credits=1)
    rig.push(req(1), req(1, "/piped"), req(2))
    waiting = rig.core.take_waiting()
    assert sorted((o[2], o[6]) for o in waiting) == [(b"1", req(1, "/piped")), (b"2", req(2))]
    assert rig.core.backlog == 0
    rig.core.accepting = False
    rig.push(req(3))
    assert rig.glue.answered == [(503, [(0, b"S", b"3", 0.0, False, False, req(3))])]


def test_a_full_backlog_answers_503(rig) -> None:
    rig.push(*[req(n) for n in range(MAX_BACKLOG + 1)])
    assert rig.core.backlog == MAX_BACKLOG
    assert [(status, [o[2] for o in orphans]) for status, orphans in rig.glue.answered] == [
        (503, [b"%d" % MAX_BACKLOG])]


def test_control_messages_go_to_the_connections_holder_only(rig) -> None:
    rig.thread(b"100/0", credits=2)
    rig.push(req(1))
    gone = control(1, b'{"type":"disconnect"}')
    rig.push(gone, control(2, b'{"type":"disconnect"}'))
    assert rig.got(b"100/0") == [[b"Q\x00", req(1)], [b"C\x00", gone]]


def test_a_stream_gets_every_message_of_its_connection_until_its_done(rig) -> None:
    rig.thread(b"100/0", credits=1)
    rig.thread(b"101/0", credits=1)
    rig.push(req(5, "/handshake"), req(5, "/early frame"))
    assert [m[1] for m in rig.got(b"100/0")] == [req(5, "/handshake")]  # the frame waits behind it
    rig.send(b"101/0", [wire.tagged(wire.STREAM, 0), b"5"])  # not its connection: nothing changes
    assert rig.got(b"101/0") == []
    rig.send(b"100/0", [wire.tagged(wire.STREAM, 0), b"5"])
    assert rig.got(b"100/0") == [[b"C\x00", req(5, "/early frame")]]
    rig.push(req(5, "/frame"), req(6, "/other"))
    assert rig.got(b"100/0") == [[b"C\x00", req(5, "/frame")]]  # no credit spent on it
    assert [m[1] for m in rig.got(b"101/0")] == [req(6, "/other")]
    rig.done(b"100/0", 5)
    rig.push(req(5, "/next"))  # the stream ended with its DONE: a request like any other
    assert [m[0][:1] for m in rig.got(b"100/0")] == [wire.REQUEST]


def test_a_stream_ends_with_its_worker(rig) -> None:
    rig.thread(b"100/0", credits=1)
    rig.push(req(5, "/handshake"))
    rig.send(b"100/0", [wire.tagged(wire.STREAM, 0), b"5"])
    rig.core.worker_gone(100)
    rig.thread(b"102/0", credits=1)
    rig.push(req(5, "/frame"))
    assert [m[0][:1] for m in rig.got(b"102/0")] == [wire.REQUEST]


def test_flow_control_credits_are_kept_per_connection(rig) -> None:
    rig.thread(b"100/0", credits=4)
    first = req(1, credits=10000)
    rig.push(first)
    assert rig.got(b"100/0") == [[b"Q\x00", first, b"10000"]]
    grant = control(1, b'{"type":"credits"}', credits=2000)
    rig.push(grant)
    rig.done(b"100/0", 1, report=b"3000")
    rig.push(req(1, "/second"))
    assert rig.got(b"100/0") == [[b"C\x00", grant], [b"Q\x00", req(1, "/second"), b"9000"]]
    rig.done(b"100/0", 1, report=b"10c")  # closed: the balance is forgotten, what comes for it dropped
    rig.push(req(1, "/third"))
    assert rig.got(b"100/0") == []
    assert rig.glue.answered == [("dropped", [(0, b"S", b"1", 0.0, False, True, req(1, "/third"))])]


def test_bad_input_is_reported_and_serving_goes_on(rig) -> None:
    rig.thread(b"100/0", credits=2)
    rig.push(b"no spaces at all", b"S x /p 0:}0:,", b"bad_sender 1 /p 0:}0:,", b"S 01 /p 0:}0:,")
    assert [raw for _, raw in rig.glue.rejected] == [b"no spaces at all", b"S x /p 0:}0:,",
                                                     b"bad_sender 1 /p 0:}0:,", b"S 01 /p 0:}0:,"]
    rig.mongrel2[0].sendall(b"\x01\x01a\x00\x01b" + zmtp.command(b"PING", b"") + zmtp.frame(req(1)))
    rig.settle()
    assert len(rig.glue.rejected) == 5  # the multi-part message
    rig.send(b"100/0", [b"?"])
    assert rig.glue.unknown == [(b"100/0", b"?")]
    assert rig.got(b"100/0") == [[b"Q\x00", req(1)]]


def test_ready_figures_lost_and_watched_fds_reach_the_glue(rig) -> None:
    control_link = rig.thread(b"100/c", credits=0)
    control_link.send([wire.READY, b"1.2"])
    control_link.send([wire.READY, b""])
    control_link.send([wire.FIGURES, b"\x93\x01\x02\x03"])
    rig.settle()
    assert rig.glue.ready == [(100, "1.2"), (100, None)]
    assert rig.glue.figures == [(100, b"\x93\x01\x02\x03")]  # the glue decodes (and checks) them
    a, b = socket.socketpair()
    rig.core.watch(a.fileno(), False)
    b.send(b"x")
    rig.core.run_once(0.0)  # not settle(): the byte stays unread, so the fd stays ready
    assert a.fileno() in rig.glue.fds
    rig.core.unwatch(a.fileno())
    a.close()
    b.close()
    assert rig.core.endpoint_open(0)
    rig.mongrel2[0].close()
    rig.settle()
    assert rig.glue.lost == [0] and not rig.core.endpoint_open(0)


def test_what_comes_for_a_connection_its_worker_closed_is_dropped(rig) -> None:
    """An upload's start refused (400 and close): its done message, parked behind it or
    arriving later, is dropped and handed to the glue (to delete its file), not served."""
    rig.thread(b"100/0", credits=1)
    rig.push(req(7, "/start"), req(7, "/done-parked"))
    assert rig.got(b"100/0") == [[b"Q\x00", req(7, "/start")]]
    rig.done(b"100/0", 7, report=b"c")
    rig.push(req(7, "/done-late"), req(8, "/other"))
    assert rig.got(b"100/0") == [[b"Q\x00", req(8, "/other")]]
    assert rig.glue.answered == [
        ("dropped", [(0, b"S", b"7", 0.0, False, True, req(7, "/done-parked"))]),
        ("dropped", [(0, b"S", b"7", 0.0, False, True, req(7, "/done-late"))]),
    ]
    rig.done(b"100/0", 8)  # not closed: what follows on 8 is served
    rig.push(req(8, "/again"))
    assert rig.got(b"100/0") == [[b"Q\x00", req(8, "/again")]]


def test_a_reattached_mongrel2_starts_with_no_closed_connections(rig) -> None:
    rig.thread(b"100/0", credits=1)
    rig.push(req(7))
    rig.got(b"100/0")
    rig.done(b"100/0", 7, report=b"c")
    ours, theirs = socket.socketpair()
    rig.core.attach(0, theirs.detach(), b"")  # Mongrel2 restarted: its connection ids start again
    rig.mongrel2[0].close()
    rig.mongrel2[0] = ours
    rig.push(req(7, "/new"))
    assert rig.got(b"100/0") == [[b"Q\x00", req(7, "/new")]]


def test_bytes_that_came_with_the_handshake_are_read_first(core_class, tmp_path) -> None:
    glue = Glue()
    core = core_class(str(tmp_path / "link"), 1, glue)
    ours, theirs = socket.socketpair()
    link = None
    try:
        link = ThreadLink(str(tmp_path / "link"), b"100/0", timeout=0.01)
        link.send([wire.CREDIT, b"2"])
        while core.run_once(0.01) > 0:
            pass
        core.attach(0, theirs.detach(), zmtp.frame(req(1)) + zmtp.frame(req(2))[:3])
        ours.sendall(zmtp.frame(req(2))[3:])
        while core.run_once(0.01) > 0:
            pass
        got = []
        while (message := link.receive()) is not None:
            got.append(message[1])
        assert got == [req(1), req(2)]
    finally:
        if link is not None:
            link.close()
        core.close()
        ours.close()


# -- the two cores, side by side ----------------------------------------------------------------


def history(seed: int) -> list[tuple]:
    rng = random.Random(seed)
    steps: list[tuple] = []
    for _ in range(120):
        kind = rng.choice(["request"] * 5 + ["credit"] * 2 + ["done"] * 4
                          + ["closing done", "gone", "retire", "control", "close", "stream", "give back"])
        steps.append((kind, rng.randrange(3), rng.randrange(2), rng.randrange(1, 4), rng.randrange(4)))
    return steps


def replay(core_class, tmp_path: Path, steps: list[tuple]) -> list:
    """Run a history; everything observable, in order."""
    # Packing by age, or paused by give-backs within a second, would depend on each core's speed.
    rig = Rig(core_class, tmp_path, pack_within=1e9, pack_pause=0.0)
    seen: list = []
    held: dict[bytes, list[int]] = {}
    try:
        for kind, worker, thread, count, conn in steps:
            pid = 100 + worker
            ident = b"%d/%d" % (pid, thread)
            if kind == "request":
                rig.push(req(conn, f"/{len(seen)}"))
            elif kind == "credit":
                if ident not in rig.links:
                    rig.thread(ident, credits=count)
                else:
                    rig.send(ident, [wire.CREDIT, b"%d" % count])
            elif kind == "done" and held.get(ident):
                rig.done(ident, held[ident].pop(0))
            elif kind == "closing done" and held.get(ident):
                rig.done(ident, held[ident].pop(0), report=b"c")
            elif kind == "gone":
                seen.append(("gone", pid, [o[:3] + o[4:] for o in rig.core.worker_gone(pid)]))
                for key in [k for k in held if k.startswith(b"%d/" % pid)]:
                    held[key] = []
                rig.core.worker_started(pid)
            elif kind == "give back" and len(held.get(ident, [])) > 1:
                rig.send(ident, [wire.tagged(wire.GIVE_BACK, 0), b"%d" % held[ident].pop()])
            elif kind == "stream" and held.get(ident):
                rig.send(ident, [wire.tagged(wire.STREAM, 0), b"%d" % held[ident][0]])
            elif kind == "retire" and ident in rig.links:
                rig.send(ident, [wire.RETIRE])
            elif kind == "control":
                rig.push(control(conn, b'{"type":"disconnect"}'))
            elif kind == "close" and ident in rig.links:
                rig.links.pop(ident).close()
                rig.settle()
                held.pop(ident, None)
            for name in sorted(rig.links):
                for message in rig.got(name):
                    seen.append((name, message))
                    if message[0][:1] == wire.REQUEST:
                        held.setdefault(name, []).append(int(message[1].split(b" ")[1]))
            seen.append(("state", rig.core.backlog, rig.core.total_served(),
                         [rig.core.busy_threads(100 + w) for w in range(3)]))
        seen.append(("waiting", [o[:3] + o[4:] for o in rig.core.take_waiting()]))
        seen.append(("answered", rig.glue.answered))
    finally:
        rig.close()
    return seen


@pytest.mark.parametrize("seed", range(12))
def test_both_cores_do_exactly_the_same(tmp_path, seed) -> None:
    compiled = compiled_core()
    steps = history(seed)
    (tmp_path / "pure").mkdir()
    (tmp_path / "compiled").mkdir()
    assert replay(compiled, tmp_path / "compiled", steps) == replay(pure_core.Core, tmp_path / "pure", steps)
