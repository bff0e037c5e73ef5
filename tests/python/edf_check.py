"""Reads an exported EDF+/BDF+ file and the original recording with pyedflib, an
independent reader, and prints what the Rust test compares, as JSON:
{"channels", "sample_rate", "labels", "max_diff": [per channel], "samples",
 "annotations": [[onset, duration, text]], "original_annotations": [...]}.

Usage: edf_check.py EXPORTED ORIGINAL
"""

import json
import sys

import numpy as np
import pyedflib


def annotations(reader):
    onsets, durations, texts = reader.readAnnotations()
    return [[float(o), float(d), str(t)] for o, d, t in zip(onsets, durations, texts)]


exported = pyedflib.EdfReader(sys.argv[1])
original = pyedflib.EdfReader(sys.argv[2])
n = exported.signals_in_file
diffs = []
samples = 0
for c in range(n):
    a = exported.readSignal(c)
    b = original.readSignal(c)
    m = min(len(a), len(b))
    samples = m
    diffs.append(float(np.max(np.abs(a[:m] - b[:m]))))
json.dump(
    {
        "channels": n,
        "sample_rate": exported.getSampleFrequency(0),
        "labels": exported.getSignalLabels(),
        "max_diff": diffs,
        "samples": samples,
        "annotations": annotations(exported),
        "original_annotations": annotations(original),
        "start": exported.getStartdatetime().isoformat(),
    },
    sys.stdout,
)
