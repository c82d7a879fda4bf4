"""Shared by the kernel benchmarks (bench_gemv.py, bench_resnet20.py): interleaved timing rounds."""
from __future__ import annotations

ROUNDS = 5  # interleaved rounds; each variant reports its fastest round (robust to other load)


def interleaved(timers: dict, rounds: int = ROUNDS) -> dict:
    """Call every timer once per round, the variants one after another, ``rounds`` times; the fastest
    result of each (seconds)."""
    best = {k: float("inf") for k in timers}
    for _ in range(rounds):
        for k, t in timers.items():
            best[k] = min(best[k], t())
    return best
