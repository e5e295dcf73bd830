#!/usr/bin/env python
"""Write synthetic abdominal CT phantoms in the MSD Task03 layout (the built-in default data).

Example:
    python tools/make_phantoms.py                                   # 48 volumes → datasets/phantoms
    python tools/make_phantoms.py --out datasets/phantoms --num 12 --seed 0 --workers 2

Volume i of a set depends only on (--seed, i), so a larger --num adds volumes without
changing the existing ones; finished volumes are skipped, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import os
import sys

from liver_d2.data.phantoms import DEFAULT_SHAPE, check_shape, write_phantom_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    root = os.environ.get("LIVER_D2_DATASETS", "datasets")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(root, "phantoms"),
                   help="output folder (default $LIVER_D2_DATASETS/phantoms, ./datasets if unset)")
    p.add_argument("--num", type=int, default=48, help="number of volumes")
    p.add_argument("--seed", type=int, default=0, help="set seed; volume i uses seed * 100003 + i")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (one volume each)")
    p.add_argument("--size", type=int, default=DEFAULT_SHAPE[0], help="in-plane size in pixels (square)")
    p.add_argument("--slices", type=int, default=DEFAULT_SHAPE[2], help="slices per volume")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = (args.size, args.size, args.slices)
    try:
        check_shape(shape)
        if args.num < 1 or args.seed < 0:
            raise ValueError("need --num >= 1 and --seed >= 0")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"writing {args.num} phantoms ({args.size}x{args.size}x{args.slices}, seed {args.seed}) → {args.out}")
    write_phantom_dataset(args.out, args.num, seed=args.seed, workers=args.workers, shape=shape, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
