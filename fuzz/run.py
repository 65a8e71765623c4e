"""The long fuzz run: every target for N inputs, one summary line each.

    python -m fuzz.run                       # 1,000,000 inputs per target
    python -m fuzz.run --runs 200000 --targets mongrel2 uploads
    python -m fuzz.run --merge               # then add new coverage to fuzz/corpus/

Each target runs in its own ``python -m fuzz.harness`` process, seeded with
fuzz/corpus/<target>/ (read-only) and its dictionary; new inputs go to a
scratch directory, which ``--merge`` minimises into the corpus (libFuzzer
-merge=1 keeps only inputs that add coverage). A crash, a hang (an input
running longer than --timeout) or a broken invariant stops that target,
keeps its scratch directory with the crash-*/timeout-* input and makes the
exit status 1. Figures: inputs run, wall time, exec/s, libFuzzer's final
cov (instrumented edges) and ft (features), corpus size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import NAMES

FUZZ = Path(__file__).resolve().parent
REPO = FUZZ.parent
DICTS = {"mongrel2": "mongrel2.dict", "uploads": "uploads.dict",
         "cluster_datagram": "cluster.dict", "cluster_signed": "cluster.dict"}
_STATUS = re.compile(rb"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", re.M)
_DONE = re.compile(rb"^Done (\d+) runs in (\d+) second", re.M)


@dataclass
class Result:
    target: str
    runs: int
    seconds: float
    cov: int
    ft: int
    corpus: str
    problems: list[str]
    log: Path

    def line(self) -> str:
        rate = self.runs / self.seconds if self.seconds else 0.0
        verdict = "ok" if not self.problems else "FAILED: " + ", ".join(self.problems)
        return (f"{self.target:17} {self.runs:>9} inputs {self.seconds:8.1f} s {rate:8.0f} exec/s"
                f"  cov {self.cov:4} ft {self.ft:5} corpus {self.corpus:>12}  crashes/hangs "
                f"{len(self.problems)}  {verdict}")


def fuzz_target(target: str, runs: int, timeout: int, work: Path, rss_limit: int) -> Result:
    new = work / "new"
    artifacts = work / "artifacts"
    uploads_tree = work / "uploads-tree"
    for directory in (new, artifacts, uploads_tree):
        directory.mkdir(parents=True)
    log = work / "fuzz.log"
    command = [
        sys.executable, "-m", "fuzz.harness", target, f"-runs={runs}", f"-timeout={timeout}",
        f"-rss_limit_mb={rss_limit}", f"-dict={FUZZ / 'dict' / DICTS[target]}",
        f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
        str(new), str(FUZZ / "corpus" / target),
    ]
    started = time.monotonic()
    with open(log, "wb") as out:
        returncode = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env={**_env(), "FLEET_FUZZ_SCRATCH": str(uploads_tree)}).returncode
    seconds = time.monotonic() - started
    text = log.read_bytes()
    statuses = _STATUS.findall(text)
    done = _DONE.search(text)
    ran = int(done[1]) if done else (int(statuses[-1][0]) if statuses else 0)
    cov, ft, corpus = (int(statuses[-1][1]), int(statuses[-1][2]),
                       f"{statuses[-1][3].decode()}/{statuses[-1][4].decode()}") if statuses else (0, 0, "-")
    problems = [p.name for p in sorted(artifacts.iterdir())]
    if returncode != 0 and not problems:
        problems.append(f"exit status {returncode}")
    return Result(target, ran, seconds, cov, ft, corpus, problems, log)


def merge(target: str, work: Path) -> str:
    corpus = FUZZ / "corpus" / target
    before = len(list(corpus.iterdir()))
    subprocess.run(
        [sys.executable, "-m", "fuzz.harness", target, "-merge=1", str(corpus), str(work / "new")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
        env={**_env(), "FLEET_FUZZ_SCRATCH": str(work / "uploads-tree")},
    )
    return f"{target}: corpus {before} -> {len(list(corpus.iterdir()))} files"


def _env() -> dict[str, str]:
    """The harness imports fuzz.targets from the repository, whatever the cwd."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (default 1,000,000)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it is a hang")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--targets", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (the machine has 2 cores)")
    parser.add_argument("--merge", action="store_true", help="add new coverage to fuzz/corpus/<target>/")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="fleet-fuzz-run-"))

    def one(target: str) -> Result:
        result = fuzz_target(target, args.runs, args.timeout, root / target, args.rss_limit_mb)
        print(result.line(), flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, args.targets))
    failed = [r for r in results if r.problems]
    if args.merge:
        for result in results:
            if not result.problems:
                print(merge(result.target, root / result.target))
    print(f"total: {sum(r.runs for r in results)} inputs, {len(failed)} target(s) with crashes or hangs")
    if failed:
        for result in failed:
            print(f"{result.target}: see {result.log} and {result.log.parent / 'artifacts'}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
