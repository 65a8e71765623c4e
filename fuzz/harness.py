#!/usr/bin/env python3
"""Run one fuzz target under atheris (libFuzzer), with fleet instrumented.

    python -m fuzz.harness TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is one of fuzz.targets.NAMES. Options are libFuzzer's: -runs=N,
-max_total_time=S, -timeout=S (a hang), -merge=1, -artifact_prefix=DIR/ ...
libFuzzer runs the inner processes of -merge=1 as ``fuzz/harness.py ARGS``
(its argv[0]), so this file is executable, finds its target in
$FLEET_FUZZ_TARGET and puts this Python first on PATH for the shebang.
The uploads target builds its chroot in a new directory inside
$FLEET_FUZZ_SCRATCH (which the caller removes), or else in a temporary
directory that a watcher process removes when the harness has exited.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script by libFuzzer (-merge=1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atheris  # noqa: E402

# Coverage guidance: instrument every fleet module the targets import. The
# C parts (tnetstring3, msgpack, json's scanner) are not instrumented.
with atheris.instrument_imports(include=["fleet"]):
    from fuzz import targets  # noqa: E402

TARGET_ENV = "FLEET_FUZZ_TARGET"


# libFuzzer ends the process with C exit(), which runs no Python atexit
# handler: a small watcher removes the directory once this process is gone.
_WATCHER = """
import os, shutil, sys, time
pid, path = int(sys.argv[1]), sys.argv[2]
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.5)
shutil.rmtree(path, ignore_errors=True)
"""


def _remove_when_gone(path: Path) -> None:
    subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid()), str(path)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in targets.NAMES:
        name = sys.argv.pop(1)
    elif os.environ.get(TARGET_ENV) in targets.NAMES:
        name = os.environ[TARGET_ENV]
    else:
        print(f"usage: python -m fuzz.harness {{{','.join(targets.NAMES)}}} [libFuzzer args]",
              file=sys.stderr)
        sys.exit(2)
    # What libFuzzer's own child processes (-merge=1) need to run this target.
    os.environ[TARGET_ENV] = name
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    scratch = None
    if name == "uploads":
        if os.environ.get("FLEET_FUZZ_SCRATCH"):  # a fresh tree per process: -merge=1 runs two
            scratch = Path(tempfile.mkdtemp(prefix="uploads-", dir=os.environ["FLEET_FUZZ_SCRATCH"]))
        else:
            scratch = Path(tempfile.mkdtemp(prefix="fleet-fuzz-uploads-"))
            _remove_when_gone(scratch)
    argv = [str(Path(__file__).resolve()), *sys.argv[1:]]
    atheris.Setup(argv, targets.build(name, scratch))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
