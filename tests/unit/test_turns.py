"""Rolling reload turns (fleet.cluster.turns): pure, the time passed in."""

from __future__ import annotations

import pytest

from fleet.cluster.turns import ROLL_HOSTS, ROLL_TIMEOUT, Turns, roll_batch


def fleet(count: int, generation: int = 1) -> list[tuple[str, int]]:
    return [(f"{i:04x}", generation) for i in range(count)]


@pytest.mark.parametrize("nodes, batch", [(1, 2), (4, 2), (20, 2), (21, 3), (50, 5), (1000, 100)])
def test_the_batch_grows_with_the_fleet(nodes: int, batch: int) -> None:
    assert roll_batch(nodes) == batch
    assert roll_batch(nodes) >= ROLL_HOSTS


def test_the_first_batch_in_node_id_order_goes_and_the_rest_wait_for_them() -> None:
    nodes = fleet(50)
    decisions = {me: Turns().may_roll(me, 2, [n for n in nodes if n[0] != me], 0.0) for me, _ in nodes}
    assert [me for me, go in decisions.items() if go] == [f"{i:04x}" for i in range(5)]


def test_a_node_goes_as_soon_as_one_ahead_finishes() -> None:
    nodes = fleet(50)
    me = "0005"
    turns = Turns()
    others = [n for n in nodes if n[0] != me]
    assert not turns.may_roll(me, 2, others, 0.0)
    others = [(node, 2 if node == "0003" else runs) for node, runs in others]  # one of the five is done
    assert turns.may_roll(me, 2, others, 1.0)


def test_a_stuck_node_is_passed_over_once_and_only_its_slot_moves_on() -> None:
    nodes = fleet(30)  # batch 3
    turns = {me: Turns() for me, _ in nodes}

    def going(now: float, done: set[str]) -> list[str]:
        view = [(node, 2 if node in done else 1) for node, _ in nodes]
        return [me for me, _ in view if me not in done
                and turns[me].may_roll(me, 2, [n for n in view if n[0] != me], now)]

    assert going(0.0, set()) == ["0000", "0001", "0002"]
    # 0001 and 0002 finish; 0000 hangs. The next two take their slots, never more.
    assert going(5.0, {"0001", "0002"}) == ["0000", "0003", "0004"]
    assert going(ROLL_TIMEOUT, {"0001", "0002"}) == ["0000", "0003", "0004"]
    # Past the timeout in its turn, 0000 gives up its slot: one more goes, not everyone.
    assert going(ROLL_TIMEOUT + 0.1, {"0001", "0002"}) == ["0000", "0003", "0004", "0005"]
    assert turns["0005"].newly_passed_over == ["0000"]
    assert going(ROLL_TIMEOUT + 0.2, {"0001", "0002"}) == ["0000", "0003", "0004", "0005"]
    assert turns["0005"].newly_passed_over == []  # said once


def test_a_new_generation_starts_the_turns_afresh() -> None:
    nodes = fleet(4)
    turns = Turns()
    others = [n for n in nodes if n[0] != "0003"]
    assert not turns.may_roll("0003", 2, others, 0.0)
    assert turns.may_roll("0003", 2, others, ROLL_TIMEOUT + 1)  # 0000 and 0001 passed over
    assert not turns.may_roll("0003", 3, [(node, 2) for node, _ in others], ROLL_TIMEOUT + 2)
