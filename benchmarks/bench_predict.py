#!/usr/bin/env python
"""What the volume predictor adds to the model, and how it compares with the research model.

On the real scan ``../shared/data/ircadb01_17/volume.nii.gz`` (512 x 512 x 119), with an
R50-FPN model (configs/retinanet_R_50_FPN_windowed.yaml, random weights: speed does not
depend on them), over the same slices at 512 px, from one run:

1. ``VolumePredictor`` wall time (reading the NIfTI, canonical orientation, channels
   through the training mapper, batched forward, 3D linking) divided by the model's pure
   forward time on inputs built beforehand. Target: at most 1.2.
2. The same predictor time divided by torchvision's ``retinanet_resnet50_fpn_v2`` (the
   research code's model, random weights, 512 px, no resize) forward time on the same
   slices. Target: below 1.0.

``--slices`` picks that many evenly spaced slices (a CPU runs all 119 in minutes, not
seconds; on a GPU use --slices 0 for all). Medians of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from liver_d2.config import load_config
from liver_d2.data.volumes import read_image
from liver_d2.engine.checkpoint import LiverCheckpointer
from liver_d2.engine.trainer import Trainer
from liver_d2.inference import VolumePredictor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R50 = os.path.join(REPO, "configs", "retinanet_R_50_FPN_windowed.yaml")
SCAN = os.path.join(os.environ.get("LIVER_D2_SHARED", os.path.join(REPO, "..", "shared")),
                    "data", "ircadb01_17", "volume.nii.gz")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scan", default=SCAN)
    p.add_argument("--slices", type=int, default=8, help="evenly spaced slices to run (0: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides, e.g. MODEL.RESNETS.NORM FrozenBN")
    args = p.parse_args()
    if not os.path.isfile(args.scan):
        raise SystemExit(f"{args.scan}: scan not found (set LIVER_D2_SHARED or --scan)")
    torch.manual_seed(0)
    cfg = load_config(R50, args.opts)
    with tempfile.TemporaryDirectory() as model_dir:
        LiverCheckpointer(Trainer.build_model(cfg), model_dir).save("model_final")
        with open(os.path.join(model_dir, "config.yaml"), "w") as f:
            f.write(cfg.dump())
        predictor = VolumePredictor(model_dir, batch_size=args.batch_size)
    volume = read_image(args.scan)
    depth = volume.shape[2]
    chosen = np.arange(depth) if args.slices <= 0 else np.linspace(0, depth - 1, args.slices).round().astype(int)
    mask = np.zeros(volume.shape, bool)
    mask[:, :, chosen] = True  # axial slice k = z index k: run exactly these slices
    print(f"{args.scan}: {volume.shape}, {len(chosen)} slices, batch {args.batch_size}, device {cfg.MODEL.DEVICE}, "
          f"{torch.get_num_threads()} threads, backbone norm {cfg.MODEL.RESNETS.NORM}, FPN {cfg.MODEL.FPN.OUT_CHANNELS} ch")

    batches = [inputs for _, inputs in predictor.batches(volume, chosen)]

    def forward_only() -> None:
        with torch.inference_mode():
            for inputs in batches:
                predictor.model(inputs)

    def predictor_run() -> None:
        predictor.predict(args.scan, liver_mask=mask)

    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    tv = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=2, min_size=512,
                                   max_size=512).eval().to(cfg.MODEL.DEVICE)
    h, w = volume.shape[1], volume.shape[0]
    tv_batches = [[torch.rand(3, h, w, device=cfg.MODEL.DEVICE) for _ in inputs] for inputs in batches]

    def torchvision_forward() -> None:
        with torch.inference_mode():
            for images in tv_batches:
                tv(images)

    forward_only(), torchvision_forward()  # warm-up (allocator, cudnn autotune)
    t_forward = median_seconds(forward_only, args.repeats)
    t_predict = median_seconds(predictor_run, args.repeats)
    t_tv = median_seconds(torchvision_forward, args.repeats)
    n = len(chosen)
    print(f"pure forward (liver_d2 R50-FPN):   {t_forward:7.2f} s  ({t_forward / n:.3f} s/slice)")
    print(f"VolumePredictor (same model):      {t_predict:7.2f} s  ({t_predict / n:.3f} s/slice)")
    print(f"torchvision retinanet_resnet50_fpn_v2 forward: {t_tv:7.2f} s  ({t_tv / n:.3f} s/slice)")
    print(f"predictor / forward     = {t_predict / t_forward:.3f}  (target <= 1.2)")
    print(f"predictor / torchvision = {t_predict / t_tv:.3f}  (target < 1.0)")


if __name__ == "__main__":
    main()
