#!/usr/bin/env python
"""How hard a prepared split's tumors are to find and to box, and what that caps COCO AP at.

Example:
    python tools/analyze_difficulty.py --dataset liver_phantom_test \
        --predictions output/demo/inference/liver_phantom_test/coco_instances_results.json

Prints boxes per detectability bin (d' of an observer told each tumor's exact footprint
in slices k-1..k+1), with the share the model found when --predictions is given; the COCO
AP a detector with perfect ranking and no false positives would reach with box edges off
by sigma px, finding every box or only those above a d' cut-off; and the model's edge
errors. Writes boxes.csv, visibility.csv, ceiling.csv, edge_errors.csv and difficulty.png
to --out.
"""
from __future__ import annotations

import argparse
import sys

from liver_d2.errors import LiverD2Error, report_skipped
from liver_d2.evaluation.difficulty import (DEFAULT_MIN_D_PRIMES, DEFAULT_SIGMAS, analyze_split, format_report,
                                            read_predictions, write_report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="liver_phantom_test", help="registered prepared split (default %(default)s)")
    p.add_argument("--predictions", help="COCO results of a model on that split (coco_instances_results.json)")
    p.add_argument("--num-slices", type=int, default=3, help="slices the observer sees, centred (default %(default)s)")
    p.add_argument("--score-thresh", type=float, default=0.05, help="predictions below are ignored (default %(default)s)")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS), help="edge errors in px")
    p.add_argument("--min-d-primes", type=float, nargs="+", default=list(DEFAULT_MIN_D_PRIMES),
                   help="d' cut-offs for the ceiling: boxes below are left unfound")
    p.add_argument("--out", default="output/difficulty", help="tables and PNG (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.num_slices < 1 or args.num_slices % 2 == 0:
            raise LiverD2Error(f"--num-slices {args.num_slices}: use an odd number, 1 or more")
        predictions = read_predictions(args.predictions) if args.predictions else None
        report = analyze_split(args.dataset, predictions, args.num_slices, args.sigmas, args.min_d_primes,
                               args.score_thresh)
    except LiverD2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    paths = write_report(report, args.out)
    print(f"\nwrote {', '.join(paths)}")
    return report_skipped(report.failures, "volume")


if __name__ == "__main__":
    sys.exit(main())
