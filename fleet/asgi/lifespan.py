"""The ASGI lifespan protocol for one worker process: startup before the worker
takes requests, shutdown after its last one.

An app that does not speak lifespan (Django's handler raises at once for any
scope but http) is served without it, as uvicorn's ``--lifespan auto`` does.
An app that took the startup event and then failed, by sending
``lifespan.startup.failed`` or by raising, fails the worker's boot the way an
import error does: the master keeps the old generation on a reload.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fleet.asgi.scope import ASGI

log = logging.getLogger("fleet.worker")


class LifespanFailed(Exception):
    """The application's startup failed; str(error) says how, in one line."""


class Lifespan:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}  # what startup put in scope["state"]; requests get a copy
        self.supported = True
        self._events: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self._received = 0
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def startup(self) -> None:
        """Run the app's startup; LifespanFailed if it failed."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._events.put({"type": "lifespan.startup"})
        answer = await self._answer()
        if answer is None:
            return
        if answer["type"] == "lifespan.startup.failed":
            raise LifespanFailed(f"the application's startup failed: {answer.get('message') or 'no reason given'}")
        if answer["type"] != "lifespan.startup.complete":
            raise LifespanFailed(f"the application answered lifespan.startup with {answer['type']!r}")

    async def shutdown(self, timeout: float) -> None:
        """Run the app's shutdown, waiting at most ``timeout`` seconds; failures are logged."""
        if not self.supported or self._task is None or self._task.done():
            return
        await self._events.put({"type": "lifespan.shutdown"})
        try:
            answer = await asyncio.wait_for(self._answer(), timeout)
        except TimeoutError:
            log.warning("the application's lifespan shutdown took more than %g s; going on", timeout)
            self._task.cancel()
            return
        if answer is not None and answer["type"] == "lifespan.shutdown.failed":
            log.error("the application's shutdown failed: %s", answer.get("message") or "no reason given")

    def close(self) -> None:
        """The worker is ending: a lifespan task still running (it ignored shutdown) is cancelled."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _answer(self) -> dict[str, Any] | None:
        """The app's next message; None if it ended without error (or never spoke lifespan)."""
        getter = asyncio.ensure_future(self._answers.get())
        await asyncio.wait([getter, self._task], return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        error = None if self._task.cancelled() else self._task.exception()
        if self._received == 0:
            # It ended before it even read the startup event: lifespan is not for it.
            self.supported = False
            log.info("the application does not speak the ASGI lifespan protocol%s; serving without it",
                     f" ({type(error).__name__}: {error})" if error is not None else "")
            return None
        if error is not None:
            raise LifespanFailed(f"the application's lifespan raised {type(error).__name__}: {error}")
        return None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI, "state": self.state}
        await self.app(scope, self._receive, self._send)

    async def _receive(self) -> dict[str, str]:
        event = await self._events.get()
        self._received += 1
        return event

    async def _send(self, message: dict[str, Any]) -> None:
        if not isinstance(message, dict) or not str(message.get("type", "")).startswith("lifespan."):
            raise LifespanFailed(f"not a lifespan message: {message!r}")
        await self._answers.put(message)
