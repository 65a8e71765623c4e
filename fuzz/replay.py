"""Replay inputs through the targets without atheris: reproduce a crash, or measure coverage.

    python -m fuzz.replay                          # every corpus through its target
    python -m fuzz.replay uploads crash-1234abcd   # some files through one target
    coverage run --branch --include='fleet/*' -m fuzz.replay && coverage report

An input that crashes raises here with its full traceback.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fuzz.targets import NAMES, build

CORPUS = Path(__file__).resolve().parent / "corpus"


def replay(name: str, paths: list[Path]) -> int:
    with tempfile.TemporaryDirectory(prefix="fleet-fuzz-replay-") as scratch:
        target = build(name, Path(scratch))
        for path in paths:
            target(path.read_bytes())
    return len(paths)


def main(argv: list[str]) -> int:
    if argv and argv[0] in NAMES:
        print(f"{argv[0]}: {replay(argv[0], [Path(p) for p in argv[1:]])} inputs, no crash")
        return 0
    if argv:
        print(f"usage: python -m fuzz.replay [{'|'.join(NAMES)} FILE...]", file=sys.stderr)
        return 2
    for name in NAMES:
        print(f"{name}: {replay(name, sorted((CORPUS / name).iterdir()))} inputs, no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
