"""The runner the micro-benchmarks share: best-of-N µs per call, or a cProfile of each case."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import timeit
from collections.abc import Callable


def run_cases(cases: dict[str, Callable[[], object]], description: str, argv: list[str] | None,
              number: int, repeat: int, per: int = 1) -> int:
    """``per``: how many operations one call of a case does; the figures are per operation."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-n", "--number", type=int, default=number)
    parser.add_argument("-r", "--repeat", type=int, default=repeat)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    for name, func in cases.items():
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(lambda func=func: [func() for _ in range(args.number)])
            print(f"--- {name}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
            continue
        best = min(timeit.repeat(func, number=args.number, repeat=args.repeat))
        print(f"{name:28} {best / args.number / per * 1e6:6.2f} µs")
    return 0
