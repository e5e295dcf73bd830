#!/usr/bin/env python
"""Find liver tumors in CT scans with a trained model: 3D lesions per scan.

Examples:
    python tools/predict.py --model output/demo --input datasets/phantoms/imagesTr/liver_5.nii.gz
    python tools/predict.py --model output/demo --input scans/ --out findings/ --nifti
    python tools/predict.py --model output/demo --input dicom_series_folder/ --liver-masks liver.nii.gz
    python tools/predict.py --model output/demo output/demo_coronal output/demo_sagittal \
        --split liver_phantom_test --out output/axes/ensemble      # 3-axis ensemble on the test scans

--model is a training output folder (its config.yaml and model_final.pth) or a config
file with --weights. Several --model folders (for example axial, coronal and sagittal
models) run as an ensemble: their 3D lesions are fused (weighted boxes fusion in 3D). Writes <out>/<id>.json per scan, <out>/lesions.csv for the run,
PNG overlays and a montage per scan, and with --nifti a label map of the lesion boxes.
"""
from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from liver_d2.data.datasets import split_scans
from liver_d2.errors import LiverD2Error, report_skipped
from liver_d2.inference.batch import BatchOptions, find_scans, predict_scans
from liver_d2.inference.ensemble import EnsemblePredictor
from liver_d2.inference.predictor import VolumePredictor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+",
                   help="training output folder, or a config .yaml (then give --weights); several: an ensemble")
    p.add_argument("--weights", help="checkpoint (.pth); default: the folder's model_final.pth")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="NIfTI files, DICOM series folders, or folders of them")
    src.add_argument("--split", help="the source scans of a prepared split, e.g. liver_phantom_test")
    p.add_argument("--out", default="output/predictions", help="output folder (default %(default)s)")
    p.add_argument("--liver-masks", help="label map (one scan) or folder of <id>.nii.gz: run only slices with liver")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    p.add_argument("--score-thresh", type=float, help="model's detection threshold (default: the config's)")
    p.add_argument("--min-score", type=float, default=0.3, help="lesions below it are left out of CSV, NIfTI, PNG")
    p.add_argument("--overlays", type=int, default=6, help="top findings drawn per scan (0: no PNG)")
    p.add_argument("--nifti", action="store_true", help="also write <id>_boxes.nii.gz on the input's grid")
    p.add_argument("--include-patient-fields", action="store_true",
                   help="copy DICOM PatientName/PatientID/PatientBirthDate into the JSON (off: outputs are de-identified)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        scans = split_scans(args.split) if args.split else find_scans(args.input)
        if not scans:
            raise LiverD2Error(f"--input {' '.join(args.input or [args.split])}: no NIfTI files or DICOM series found")
        if args.weights and len(args.model) > 1:
            raise LiverD2Error("--weights goes with a single --model; give each ensemble member as a training output folder")
        members = [VolumePredictor(m, args.weights, batch_size=args.batch_size, score_thresh=args.score_thresh)
                   for m in args.model]
        predictor = members[0] if len(members) == 1 else EnsemblePredictor(members)
        options = BatchOptions(min_score=args.min_score, overlays=args.overlays, nifti=args.nifti,
                               include_patient_fields=args.include_patient_fields, liver_masks=args.liver_masks)
        result = predict_scans(predictor, scans, args.out, options)
    except LiverD2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.volumes:
        print(pd.DataFrame(result.volumes).to_string(index=False))
    total = sum(v["lesions"] for v in result.volumes)
    print(f"\n{len(result.volumes)} of {len(scans)} scans done, {total} lesions with score >= {args.min_score}; "
          f"{result.lesions_csv}, per-scan JSON in {os.path.abspath(args.out)}")
    return report_skipped(result.failures, "scan")


if __name__ == "__main__":
    sys.exit(main())
