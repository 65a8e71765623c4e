"""User mistakes end with one line on stderr, a fixed exit code, and no process left behind."""

from __future__ import annotations

import socket

import pytest

from fleet.dev.mongrel2 import free_port, tcp_pair
from tests.support.harness import APPS, Harness, group_members

USAGE = 2
APP_LOAD_FAILED = 4


def _endpoint() -> str:
    send, recv = tcp_pair()  # nothing listens there; the master must fail before it matters
    return f"{send},{recv}"


def _run(harness: Harness, args: list[str]) -> tuple[int, list[str]]:
    master = harness.master(args, ready=False)
    code = master.wait_exit(timeout=30)
    assert group_members(master.pid) == [], "a failed start left processes behind"
    lines = [line for line in master.stderr_text().splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize("args", [
    ["--zeromq", "nonsense", "--module", "apps:hello"],
    ["--zeromq", "tcp://127.0.0.1:99999,tcp://127.0.0.1:5001", "--module", "apps:hello"],
    ["--zeromq", "tcp://127.0.0.1:5000", "--module", "apps:hello"],
    ["--zeromq", "ENDPOINT", "--module", "apps:hello", "-p", "0"],
    ["--zeromq", "ENDPOINT", "--module", "apps:hello", "--threads", "0"],
    ["--zeromq", "ENDPOINT", "--module", "not a module name"],
    ["--zeromq", "ENDPOINT", "--module", "apps:hello", "--dispatch", "teleport"],
    ["--module", "apps:hello"],
    ["--zeromq", "ENDPOINT"],
    ["--http", "nonsense", "--module", "apps:hello"],
    ["--http", "127.0.0.1:99999", "--module", "apps:hello"],
    ["--http", "TAKEN", "--module", "apps:hello"],
    ["--http", "127.0.0.1:1", "--http", "127.0.0.1:1", "--module", "apps:hello"],
    ["--http", "FREE", "--module", "apps:hello", "--http-timeout", "0"],
], ids=["not-an-endpoint", "port-out-of-range", "one-spec-only", "p0", "threads0",
        "bad-module-syntax", "bad-dispatch", "no-zeromq", "no-module",
        "http-not-an-address", "http-port-out-of-range", "http-port-taken", "http-twice", "http-timeout-0"])
def test_usage_errors(harness: Harness, args: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        placeholders = {"ENDPOINT": _endpoint(), "TAKEN": f"127.0.0.1:{taken.getsockname()[1]}",
                        "FREE": f"127.0.0.1:{free_port()}"}
        args = [placeholders.get(a, a) for a in args]
        code, lines = _run(harness, [*args, "--pythonpath", str(APPS)])
    assert code == USAGE, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("fleet: error:"), lines


@pytest.mark.parametrize("module", [
    "fleet_test_no_such_module",
    "apps:no_such_callable",
    "no_callable_app",
    "broken_import_app",
    "broken_syntax_app",
    "apps.nested:application",
], ids=["missing-module", "missing-callable", "no-application", "import-error", "syntax-error",
        "not-a-package"])
def test_app_load_errors(harness: Harness, module: str) -> None:
    code, lines = _run(harness, ["--zeromq", _endpoint(), "--module", module,
                                 "--pythonpath", str(APPS), "-p", "2"])
    assert code == APP_LOAD_FAILED, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("fleet:"), lines
