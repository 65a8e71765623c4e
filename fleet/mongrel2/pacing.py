"""How fast one response may leave for Mongrel2, as plain arithmetic: the caller
passes the clock's readings and does the waiting.

Mongrel2 kills a connection that has more than 16 undelivered messages
(DELIVER_OUTSTANDING_MSGS), so a fast generator must not become a burst of
tiny messages: after a short burst, chunks are coalesced and sent at most one
message per PACE_INTERVAL. With ``download.flow_control=1`` Mongrel2 tells
how many bytes it will accept (DOWNLOAD_CREDITS): then the limit is bytes too.
"""

from __future__ import annotations

# Mongrel2 holds at most 16 undelivered messages per connection; keep well below.
BURST_MESSAGES = 8
# After a burst, at most one message per interval (500 messages 1 ms apart were
# all delivered in the protocol measurements).
PACE_INTERVAL = 0.001
# Coalesced data is sent without waiting for the pace once this much is buffered.
MAX_BUFFERED = 1 << 20


class Pacer:
    """A token bucket of messages: BURST_MESSAGES at once, then one per PACE_INTERVAL."""

    __slots__ = ("tokens", "last")

    def __init__(self, now: float) -> None:
        self.tokens = float(BURST_MESSAGES)
        self.last = now

    def refill(self, now: float) -> float:
        """The tokens there are at ``now``."""
        self.tokens = min(BURST_MESSAGES, self.tokens + (now - self.last) / PACE_INTERVAL)
        self.last = now
        return self.tokens

    def may_flush(self, now: float, buffered: int) -> bool:
        """Whether buffered data should leave now rather than wait for more to coalesce."""
        return self.refill(now) >= 1 or buffered >= MAX_BUFFERED

    def take(self, now: float) -> bool:
        """Spend a token for one message; False (nothing spent) if none is there yet."""
        if self.refill(now) < 1:
            return False
        self.tokens -= 1
        return True


class CreditWindow:
    """Mongrel2's download credits for one response: bytes it will still accept."""

    __slots__ = ("balance",)

    def __init__(self, balance: int) -> None:
        self.balance = balance

    def grant(self, credits: int) -> None:
        self.balance += credits

    @property
    def open(self) -> bool:
        return self.balance > 0

    def take(self, size: int) -> int:
        """How many of ``size`` bytes may be sent now (all, or the balance); spends them."""
        allowed = min(size, max(self.balance, 0))
        self.balance -= allowed
        return allowed
