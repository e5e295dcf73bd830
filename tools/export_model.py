#!/usr/bin/env python
"""Export a trained model to TorchScript (traced) for deployment without liver_d2.

Example:
    python tools/export_model.py --model output/demo --out output/demo/torchscript \
        --sample datasets/phantoms/imagesTr/liver_0.nii.gz

Writes model.ts (input: one CHW tensor of network channels; outputs: boxes, classes,
scores, image size) and export_info.json with the channel recipe.
"""
from __future__ import annotations

import argparse
import sys

from liver_d2.errors import LiverD2Error
from liver_d2.inference.export import export_torchscript


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="training output folder, or a config .yaml (then give --weights)")
    p.add_argument("--weights", help="checkpoint (.pth); default: the folder's model_final.pth")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sample", help="a scan whose middle slice is traced (default: a blank slice)")
    args = p.parse_args(argv)
    try:
        path = export_torchscript(args.model, args.out, args.weights, args.sample)
    except LiverD2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"TorchScript model: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
