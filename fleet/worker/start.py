"""What every worker process does first, WSGI or ASGI: read its spec and tie its life to the supervisor's."""

from __future__ import annotations

import ctypes
import os
import signal

from fleet.worker.spec import WorkerSpec

PR_SET_PDEATHSIG = 1


def adopt(argv: list[str]) -> WorkerSpec | None:
    """The spec the supervisor wrote on the command line; None if that supervisor is gone already."""
    spec = WorkerSpec.from_json(argv[0])
    die_with_parent()
    if os.getppid() != spec.parent_pid:
        return None
    return spec


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us if our parent dies (the supervisor, or its fork server), so
    no worker is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
