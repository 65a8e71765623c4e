"""Run one fuzz target under atheris (libFuzzer), with fleet instrumented.

    python -m fuzz.harness TARGET [libFuzzer options] [CORPUS_DIR ...]

TARGET is one of fuzz.targets.NAMES. Options are libFuzzer's: -runs=N,
-max_total_time=S, -timeout=S (a hang), -merge=1, -artifact_prefix=DIR/ ...
The uploads target builds its chroot in $FLEET_FUZZ_SCRATCH (an empty
directory the caller removes) or else in a temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

# Coverage guidance: instrument every fleet module the targets import. The
# C parts (tnetstring3, msgpack, json's scanner) are not instrumented.
with atheris.instrument_imports(include=["fleet"]):
    from fuzz import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.NAMES:
        print(f"usage: python -m fuzz.harness {{{','.join(targets.NAMES)}}} [libFuzzer args]",
              file=sys.stderr)
        sys.exit(2)
    name = sys.argv.pop(1)
    scratch = None
    if name == "uploads":
        if os.environ.get("FLEET_FUZZ_SCRATCH"):
            scratch = Path(os.environ["FLEET_FUZZ_SCRATCH"])
        else:
            scratch = Path(tempfile.mkdtemp(prefix="fleet-fuzz-uploads-"))
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    atheris.Setup(sys.argv, targets.build(name, scratch))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
