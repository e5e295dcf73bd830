#!/usr/bin/env python
"""Training speed on the CPU, and what the data mapper costs next to it, from one run.

Prints the median seconds per training iteration (forward + backward + optimizer step, on
batches mapped beforehand, warm-up steps left out) for

* the demo model (configs/demo/retinanet_R18_phantom_cpu.yaml) on 256 px phantom slices,
* R50-FPN (configs/retinanet_R_50_FPN_windowed.yaml) on 512 px phantom slices,

and the training mapper's median time per image (``LiverDatasetMapper(cfg, is_train=True)``
with the windowed config's augmentations, on the same 512 px slices) divided by the R50-FPN
training step time per image. Target (issue): the mapper costs at most 10% of a training
step per image on the same CPU. The data is synthetic: phantoms made and prepared here, in
a temporary folder removed at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage

from liver_d2.config import load_config
from liver_d2.data.datasets import register_prepared
from liver_d2.data.mapper import LiverDatasetMapper
from liver_d2.data.phantoms import write_phantom_dataset
from liver_d2.data.prepare import PrepareOptions, prepare_dataset
from liver_d2.engine.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo", "retinanet_R18_phantom_cpu.yaml")
R50 = os.path.join(REPO, "configs", "retinanet_R_50_FPN_windowed.yaml")


def load_cfg(path: str):
    return load_config(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])


def phantom_images(tmp: str, name: str, num: int, size: int, slices: int) -> list[dict]:
    """``num`` phantoms of size x size x slices, prepared; every image as a dataset dict."""
    source = os.path.join(tmp, f"{name}_src")
    write_phantom_dataset(source, num, seed=7, workers=1, shape=(size, size, slices), verbose=False)
    folder = os.path.join(tmp, name)
    prepare_dataset(source, folder, PrepareOptions(workers=1, split_ratios=(1, 0, 0)), name=name)
    register_prepared(folder, name)
    dicts = DatasetCatalog.get(f"{name}_train")
    # tumor slices first, so every timed batch has boxes to match
    return sorted(dicts, key=lambda d: not d["annotations"])


def time_training(cfg, images: list[dict], batch: int, steps: int, warmup: int) -> list[float]:
    """Seconds per step (forward + backward + step) on fixed, already mapped batches."""
    model = Trainer.build_model(cfg)  # detectron2's build_model (+ P7 frozen, as in training)
    model.train()
    optimizer = Trainer.build_optimizer(cfg, model)  # SGD with the config's gradient clipping
    mapper = LiverDatasetMapper(cfg, is_train=True)
    batches = [[mapper(images[(i * batch + j) % len(images)]) for j in range(batch)] for i in range(2)]
    times = []
    with EventStorage(0):
        for step in range(warmup + steps):
            data = batches[step % len(batches)]
            start = time.perf_counter()
            losses = sum(model(data).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return times


def time_mapper(cfg, images: list[dict], passes: int) -> list[float]:
    """Seconds per image of the training mapper (read, augment, channels, boxes)."""
    mapper = LiverDatasetMapper(cfg, is_train=True)
    for d in images[:2]:
        mapper(d)  # warm-up
    times = []
    for _ in range(passes):
        for d in images:
            start = time.perf_counter()
            mapper(d)
            times.append(time.perf_counter() - start)
    return times


def fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r50-batch", type=int, default=2, help="images per R50-FPN step (config: 16 over 8 GPUs)")
    p.add_argument("--demo-batch", type=int, default=0, help="images per demo step (0 = the config's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--mapper-images", type=int, default=24, help="512 px images the mapper is timed on")
    p.add_argument("--mapper-passes", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    try:
        demo_cfg, r50_cfg = load_cfg(DEMO), load_cfg(R50)
        demo_batch = args.demo_batch or demo_cfg.SOLVER.IMS_PER_BATCH
        demo_images = phantom_images(tmp, "bench256", 4, 256, 24)
        r50_images = phantom_images(tmp, "bench512", 4, 512, 24)

        demo_times = time_training(demo_cfg, demo_images, demo_batch, args.steps, args.warmup)
        r50_times = time_training(r50_cfg, r50_images, args.r50_batch, args.steps, args.warmup)
        mapper_times = time_mapper(r50_cfg, r50_images[: args.mapper_images], args.mapper_passes)

        demo_med, r50_med = statistics.median(demo_times), statistics.median(r50_times)
        mapper_med = statistics.median(mapper_times)
        r50_per_image = r50_med / args.r50_batch
        ratio = mapper_med / r50_per_image
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
              f"load average at the end {load:.2f}; {args.steps} timed steps after {args.warmup} warm-up")
        print(f"demo R18 (256 px, batch {demo_batch}): {demo_med:.2f} s/iter median "
              f"({demo_med / demo_batch:.3f} s/image; runs: {fmt(demo_times)})")
        print(f"R50-FPN windowed (512 px, batch {args.r50_batch}): {r50_med:.2f} s/iter median "
              f"({r50_per_image:.3f} s/image; runs: {fmt(r50_times)})")
        print(f"training mapper (windowed, augmented, 512 px): {mapper_med * 1000:.1f} ms/image median "
              f"over {len(mapper_times)} calls (min {min(mapper_times) * 1000:.1f}, max {max(mapper_times) * 1000:.1f})")
        print(f"mapper / R50-FPN step per image: {ratio:.3f}  "
              f"(target <= 0.10: {'met' if ratio <= 0.10 else 'missed'})")
        print(f"benchmark wall time: {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
