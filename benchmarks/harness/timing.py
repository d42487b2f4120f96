"""Interleaved A/B timing of step runners, and its statistics."""

from __future__ import annotations

import statistics
import time

import numpy as np

def interleaved_timing(runners: dict, repetitions: int, steps: int, warmup: int) -> dict:
    """Time each runner (name -> callable running one synchronous step) in
    interleaved blocks. Block order alternates A,B / B,A so slow drift of the
    machine (other jobs on a shared box) hits both alike; the ratio is taken
    per repetition, between adjacent blocks, and summarised by its median and
    inter-quartile range."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    samples = {name: [] for name in names}
    for rep in range(repetitions):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                runners[name]()
                times.append(time.perf_counter() - start)
            samples[name].append(statistics.median(times))
    return samples


def ratio_stats(numerator, denominator) -> dict:
    ratios = [a / b for a, b in zip(numerator, denominator)]
    q = np.percentile(ratios, [25, 50, 75])
    return {
        "median": float(q[1]),
        "q25": float(q[0]),
        "q75": float(q[2]),
        "iqr": float(q[2] - q[0]),
        "repetitions": len(ratios),
    }


def time_stats(samples) -> dict:
    q = np.percentile(samples, [25, 50, 75])
    return {"median_s": float(q[1]), "q25_s": float(q[0]), "q75_s": float(q[2])}
