#!/usr/bin/env python3
"""What Albi's features cost in numpy/scipy on this machine: the yardstick of
`cargo bench -p clisonix-signal --bench features` (the goal is 10x faster).

Times `features()` of the reference script (shared/data/make_reference.py: Welch PSD,
band powers, relative powers, peak alpha, spectral entropy, Hjorth), vectorised over
32-channel 2-second windows at 128 and 256 Hz, and prints microseconds per
channel-window: the median of several runs, each over many windows at once. Albi also
computes signal quality and the 1/f exponent, which this leaves out, so the
comparison favours scipy.

Run (needs numpy and scipy: `pip install numpy scipy`):
    python3 stages/signal/benches/scipy_features.py
The reference script is found in $CLISONIX_DATA_DIR or ../shared/data.
"""
import importlib.util
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.environ.get("CLISONIX_DATA_DIR") or os.path.join(HERE, "..", "..", "..", "..", "shared", "data")


def reference_module():
    path = os.path.join(DATA, "make_reference.py")
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found (set CLISONIX_DATA_DIR to the folder holding make_reference.py)")
    spec = importlib.util.spec_from_file_location("make_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ref = reference_module()
    rng = np.random.default_rng(7)
    print("albi's reference features in numpy/scipy, vectorised: 2 s windows, 32 channels per window set")
    print(f"{'fs (Hz)':>8} {'samples':>8} {'channel-windows':>16} {'us/ch-window':>13} {'runs':>5}")
    for fs in (128, 256):
        n = 2 * fs
        windows = 100
        t = np.arange(n) / fs
        # A few rhythms plus noise, as the Rust benchmark uses; the values do not matter
        # for the cost.
        x = (30 * np.sin(2 * np.pi * 10 * t) + 12 * np.sin(2 * np.pi * 6 * t)
             + rng.normal(0, 3, size=(windows, 32, n)))
        ref.features(x, fs)  # warm-up
        per = []
        for _ in range(9):
            start = time.perf_counter()
            ref.features(x, fs)
            per.append((time.perf_counter() - start) * 1e6 / (windows * 32))
        print(f"{fs:>8} {n:>8} {windows * 32:>16} {statistics.median(per):>13.2f} {len(per):>5}")


if __name__ == "__main__":
    main()
