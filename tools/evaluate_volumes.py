#!/usr/bin/env python
"""Lesion-level evaluation of saved predictions (tools/predict.py JSON) against label maps.

Example:
    python tools/predict.py --model output/demo --input datasets/phantoms/imagesTr --out output/pred
    python tools/evaluate_volumes.py --predictions output/pred --data datasets/phantoms

Prints sensitivity at 1/8..8 false positives per volume, CPM, 3D AP and recall by lesion
size; writes lesion_metrics.json, CSV tables and froc.png / pr.png to --out.
"""
from __future__ import annotations

import argparse
import sys

from liver_d2.errors import LiverD2Error, report_skipped
from liver_d2.evaluation.lesion_evaluator import evaluate_prediction_folder
from liver_d2.evaluation.lesion_metrics import DEFAULT_IOU, format_summary, write_lesion_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="folder of <id>.json from tools/predict.py")
    p.add_argument("--data", required=True, help="dataset folder with the label maps (MSD or LiTS layout)")
    p.add_argument("--out", help="where metrics, tables and plots go (default: <predictions>/evaluation)")
    p.add_argument("--iou", type=float, default=DEFAULT_IOU, help="3D box IoU for a match (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics, problems = evaluate_prediction_folder(args.predictions, args.data, args.iou)
    except LiverD2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or f"{args.predictions.rstrip('/')}/evaluation"
    write_lesion_metrics(metrics, out)
    print(metrics.per_volume.to_string(index=False))
    print("\n" + format_summary(metrics.summary))
    print(f"\ntables and froc.png / pr.png in {out}")
    return report_skipped(problems, "prediction file")


if __name__ == "__main__":
    sys.exit(main())
