#!/usr/bin/env python
"""Write synthetic abdominal CT phantoms in the MSD Task03 layout (the built-in default data).

Example:
    python tools/make_phantoms.py                                   # 40 volumes → datasets/phantoms
    python tools/make_phantoms.py --out datasets/phantoms --num 12 --seed 0 --workers 2

Volume i of a set depends only on (--seed, i), so a larger --num adds volumes without
changing the existing ones; finished volumes are skipped, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    from liver_d2.data.phantoms import DEFAULT_SHAPE, write_phantom_dataset
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from liver_d2.data.phantoms import DEFAULT_SHAPE, write_phantom_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    root = os.environ.get("LIVER_D2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(root, "phantoms"),
                   help="output folder (default $LIVER_D2_DATASETS/phantoms, ./datasets if unset)")
    p.add_argument("--num", type=int, default=40, help="number of volumes")
    p.add_argument("--seed", type=int, default=0, help="set seed; volume i uses seed * 100003 + i")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one volume each)")
    p.add_argument("--size", type=int, default=DEFAULT_SHAPE[0], help="in-plane size in pixels (square)")
    p.add_argument("--slices", type=int, default=DEFAULT_SHAPE[2], help="slices per volume")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num < 1 or args.size < 32 or args.slices < 8 or args.seed < 0:
        print("error: need --num >= 1, --size >= 32, --slices >= 8 and --seed >= 0", file=sys.stderr)
        return 2
    print(f"writing {args.num} phantoms ({args.size}x{args.size}x{args.slices}, seed {args.seed}) → {args.out}")
    write_phantom_dataset(args.out, args.num, seed=args.seed, workers=args.workers,
                          shape=(args.size, args.size, args.slices), verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
