#!/usr/bin/env python
"""Preparation speed against the decompression floor, measured side by side in one run.

Prints the median wall time to prepare N phantom volumes (with W workers) divided by the
median wall time to only load the same volumes and labels with nibabel in one process.
Target (issue 2): at most 1.5 with 2 workers on 2 cores. Runs alternate so that machine
noise hits both sides alike.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import nibabel as nib
import numpy as np

from liver_d2.data.phantoms import write_phantom_dataset
from liver_d2.data.prepare import PrepareOptions, prepare_dataset
from liver_d2.data.volumes import find_cases


def load_all(source: str) -> float:
    start = time.perf_counter()
    for case in find_cases(source):
        np.asanyarray(nib.load(case.image).dataobj)
        np.asanyarray(nib.load(case.label).dataobj)
    return time.perf_counter() - start


def prepare_all(source: str, workers: int) -> float:
    out = tempfile.mkdtemp(prefix="bench_prep_")
    try:
        start = time.perf_counter()
        result = prepare_dataset(source, out, PrepareOptions(workers=workers), "bench")
        elapsed = time.perf_counter() - start
        assert not result.failures, result.failures
        return elapsed
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num", type=int, default=8, help="phantom volumes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--source", help="an existing MSD/LiTS folder instead of fresh phantoms")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_src_")
    try:
        source = args.source
        if source is None:
            source = os.path.join(tmp, "phantoms")
            write_phantom_dataset(source, args.num, seed=0, workers=args.workers)
        n = len(find_cases(source))
        load_all(source)  # warm the page cache so both sides read from memory
        loads, preps = [], []
        for _ in range(args.repeats):
            loads.append(load_all(source))
            preps.append(prepare_all(source, args.workers))
        load_med, prep_med = statistics.median(loads), statistics.median(preps)
        print(f"\nvolumes: {n}, workers: {args.workers}, repeats: {args.repeats}, cores: {os.cpu_count()}")
        print(f"nibabel load (floor), median: {load_med:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in loads)})")
        print(f"prepare, median:              {prep_med:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in preps)})")
        ratio = prep_med / load_med
        print(f"prepare / load ratio: {ratio:.2f}  (target <= 1.5: {'met' if ratio <= 1.5 else 'missed'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
