"""Rolling reload turns, which every node works out from the same heartbeat table.

No coordinator: the nodes still on an older generation queue in node-id
order, and the first ``batch`` of the queue are in their turn. A node leaves
the queue when its heartbeat shows the new generation, and the next one
enters its turn, so the roll is paced by the nodes ahead finishing.

- The batch grows with the fleet: ROLL_FRACTION of its nodes, at least
  ROLL_HOSTS. So never more than about a tenth of the nodes reload at once
  (each one gracefully, keeping most of its own workers serving), and a
  fleet of 1,000 rolls in about ten turns rather than five hundred.
- A node in its turn for longer than ROLL_TIMEOUT (its reload failed or
  hangs) is passed over: the next in line takes its slot. A stuck node
  delays the roll once, by ROLL_TIMEOUT, and turns never collapse into
  everyone reloading at once, however long the queue.

Pure: node ids and generations in, a decision out; the time is passed in.
"""

from __future__ import annotations

import math

ROLL_HOSTS = 2  # the smallest batch
ROLL_FRACTION = 0.1  # of the fleet's nodes, reloading at once
ROLL_TIMEOUT = 30.0  # seconds a node may be in its turn before the next one takes its slot


def roll_batch(nodes: int) -> int:
    """How many of `nodes` may reload at once."""
    return max(ROLL_HOSTS, math.ceil(ROLL_FRACTION * nodes))


class Turns:
    """One node's view of the turns of a roll to one generation (a new generation starts afresh)."""

    def __init__(self, timeout: float = ROLL_TIMEOUT) -> None:
        self.timeout = timeout
        self._generation: int | None = None
        self._turn_began: dict[str, float] = {}  # node id -> when we first saw it in its turn
        self._passed_over: set[str] = set()
        self.newly_passed_over: list[str] = []  # by the last may_roll(), for the caller to log

    def may_roll(self, me: str, generation: int, others: list[tuple[str, int]], now: float) -> bool:
        """Whether node `me` may move to `generation` now. `others`: (node id, generation
        it runs) of every other live node."""
        if generation != self._generation:
            self._generation = generation
            self._turn_began.clear()
            self._passed_over.clear()
        self.newly_passed_over = []
        batch = roll_batch(len(others) + 1)
        ahead = sorted(node for node, runs in others if runs < generation and node < me)
        slots = 0
        for node in ahead:
            if slots >= batch:
                return False
            began = self._turn_began.setdefault(node, now)
            if now - began <= self.timeout:
                slots += 1
            elif node not in self._passed_over:
                self._passed_over.add(node)
                self.newly_passed_over.append(node)
        return slots < batch
