#!/usr/bin/env python
"""Prepare a folder of CT volumes (MSD Task03, LiTS or phantoms) as registered slice datasets.

Example:
    python tools/prepare_data.py --source datasets/phantoms            # → datasets/liver_phantom
    python tools/prepare_data.py --source datasets/Task03_Liver --axis coronal
"""
from __future__ import annotations

import argparse
import os
import sys

from liver_d2.data.prepare import PrepareOptions, prepare_dataset
from liver_d2.data.volumes import find_cases
from liver_d2.errors import LiverD2Error, report_skipped


def default_name(source: str, axis: str) -> str:
    """datasets/phantoms → liver_phantom, Task03_Liver → liver_msd, LiTS → liver_lits."""
    base = os.path.basename(os.path.normpath(source)).lower()
    if "phantom" in base:
        name = "liver_phantom"
    elif "task03" in base or os.path.isdir(os.path.join(source, "imagesTr")):
        name = "liver_msd"
    elif "lits" in base:
        name = "liver_lits"
    else:
        name = f"liver_{base}"
    return name if axis == "axial" else f"{name}_{axis}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="folder in MSD (imagesTr/labelsTr) or LiTS layout")
    p.add_argument("--name", help="dataset name; registers <name>_train/_val/_test (default from --source)")
    p.add_argument("--out", help="output folder (default $LIVER_D2_DATASETS/<name>, ./datasets if unset)")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--connectivity", type=int, default=8, choices=[4, 8], help="2D tumor component connectivity")
    p.add_argument("--min-pixels", type=int, default=0, help="drop tumor components under this many pixels")
    p.add_argument("--min-area-mm2", type=float, default=0.0, help="drop tumor components under this area")
    p.add_argument("--context", type=int, default=2, help="neighbour slices kept on each side (2.5D input)")
    p.add_argument("--store-all-slices", action="store_true", help="store every slice, not just liver ± context")
    p.add_argument("--split-protocol", default="random", choices=["random", "research"],
                   help="random: by patient, seeded; research: volumes in order until train holds 80%% of tumor slices")
    p.add_argument("--split-ratios", type=float, nargs=3, default=[0.7, 0.15, 0.15], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negatives-per-positive", type=float, default=1.0,
                   help="tumor-free liver slices per tumor slice in each split (-1: all)")
    p.add_argument("--png-compression", type=int, default=0, choices=range(10), metavar="0-9",
                   help="zlib level of the 16-bit slice PNGs: 0 fastest (default), 1 about half the size")
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = args.name or default_name(args.source, args.axis)
    root = os.environ.get("LIVER_D2_DATASETS", "datasets")
    out_dir = args.out or os.path.join(root, name)
    options = PrepareOptions(
        axis=args.axis, connectivity=args.connectivity, min_pixels=args.min_pixels,
        min_area_mm2=args.min_area_mm2, context=args.context, store_all_slices=args.store_all_slices,
        split_protocol=args.split_protocol, split_ratios=tuple(args.split_ratios), seed=args.seed,
        negatives_per_positive=args.negatives_per_positive, workers=args.workers,
        png_compression=args.png_compression,
    )
    try:
        n_cases = len(find_cases(args.source))
        print(f"preparing {n_cases} volumes from {args.source} → {out_dir} ({args.axis})")
        result = prepare_dataset(args.source, out_dir, options, name)
    except LiverD2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{name}: {out_dir} (reused {result.skipped} finished volumes)")
    print(result.summary.to_string())
    if not result.lesions.empty:
        print("\ntumors (3D components):")
        print(result.lesions.to_string(index=False))
    print(f"\nregistered as: {', '.join(f'{name}_{s}' for s in ('train', 'val', 'test'))}")
    return report_skipped(result.failures, "volume")


if __name__ == "__main__":
    sys.exit(main())
