#!/usr/bin/env python3
"""Writes the synthetic spindle-temperature series that `slmd eval --kind
anomaly` scores detectors on (tests/fixtures/factory/).

It is generated, not recorded: a seeded model of a machine-tool spindle
(65 C, a slow 2-hour load cycle of +-1.5 C, AR(1) sensor noise of about
0.3 C, one reading every 10 s for 6 hours) with five labelled faults of
different kinds, one of which (a stuck sensor) the point detectors are not
expected to catch. Rerunning the script gives the same bytes.

    python3 scripts/gen-factory-series.py tests/fixtures/factory
"""
import math
import random
import sys
from pathlib import Path

SEED = 20261124
STEP = 10  # seconds between readings
HOURS = 6
T0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC


def main(out: Path) -> None:
    rng = random.Random(SEED)
    n = HOURS * 3600 // STEP
    faults = [
        # (kind, start offset s, end offset s)
        ("spike", 2400, 2400),  # one glitch reading, +8 C
        ("overheat", 5400, 6300),  # rises ~15 C over 5 min, cools over 10
        ("step_down", 10800, 11700),  # coolant change: -5 C for 15 min
        ("drift", 14400, 15600),  # +0.5 C per minute for 20 min, then back
        ("stuck", 18000, 19200),  # sensor repeats its last value for 20 min
    ]
    noise = 0.0
    values = []
    for i in range(n):
        t = i * STEP
        noise = 0.8 * noise + rng.gauss(0, 0.18)
        v = 65.0 + 1.5 * math.sin(2 * math.pi * t / 7200) + noise
        if t == 2400:
            v += 8.0
        if 5400 <= t < 5700:
            v += 15.0 * (t - 5400) / 300
        elif 5700 <= t <= 6300:
            v += 15.0 * (1 - (t - 5700) / 600)
        if 10800 <= t <= 11700:
            v -= 5.0
        if 14400 <= t <= 15600:
            v += 0.5 * (t - 14400) / 60 if t < 15600 else 0.0
        if 18000 <= t <= 19200:
            v = values[18000 // STEP - 1]
        values.append(round(v, 2))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "spindle.csv", "w") as f:
        f.write("ts,spindle_temp\n")
        for i, v in enumerate(values):
            f.write(f"{T0 + i * STEP},{v}\n")
    with open(out / "spindle-faults.csv", "w") as f:
        f.write("kind,start,end\n")
        for kind, a, b in faults:
            f.write(f"{kind},{T0 + a},{T0 + b}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/factory"))
