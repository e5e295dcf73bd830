"""PNG overlays of predictions against ground truth, for people to look at.

Each picture is one slice shown in a liver window, ground-truth boxes in green and
predicted boxes in red with their scores; the slices with the most tumors come first.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402

from liver_d2.data.channels import window_hu  # noqa: E402
from liver_d2.data.slice_io import read_hu_slice  # noqa: E402

DISPLAY_WINDOW = (-100.0, 400.0)  # liver window for looking, whatever the model's input was


def _pick_images(dicts: list[dict], by_image: dict[int, list[dict]], count: int) -> list[dict]:
    """Slices with the most tumors, plus the negative slice with the highest false score."""
    ranked = sorted(dicts, key=lambda d: (-len(d["annotations"]), d["image_id"]))
    chosen = ranked[: max(count - 1, 1)]
    negatives = [d for d in dicts if not d["annotations"] and by_image.get(d["image_id"])]
    if negatives and count > 1:
        chosen.append(max(negatives, key=lambda d: max(p["score"] for p in by_image[d["image_id"]])))
    return chosen


def draw_overlay(dataset_dict: dict, predictions: list[dict], path: str, score_thresh: float) -> None:
    hu = read_hu_slice(dataset_dict["file_name"], dataset_dict.get("hu_offset", 32768))
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.imshow(window_hu(hu, *DISPLAY_WINDOW), cmap="gray", vmin=0, vmax=1)
    for ann in dataset_dict["annotations"]:
        x, y, w, h = ann["bbox"]
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="lime", linewidth=1.2))
    for p in predictions:
        if p["score"] < score_thresh:
            continue
        x, y, w, h = p["bbox"]
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", linewidth=1.0))
        ax.text(x, y - 2, f"{p['score']:.2f}", color="red", fontsize=7)
    ax.set_title(f"{dataset_dict.get('volume_id', '')} slice {dataset_dict.get('slice_index', '')}: "
                 f"green truth, red predicted", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_overlays(dataset_name: str, predictions_json: str, out_dir: str, cfg) -> list[str]:
    """Draw ``cfg.TEST.NUM_OVERLAYS`` slices of a dataset with COCO-format predictions."""
    with open(predictions_json) as f:
        predictions = json.load(f)
    by_image: dict[int, list[dict]] = defaultdict(list)
    for p in predictions:
        by_image[p["image_id"]].append(p)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for d in _pick_images(DatasetCatalog.get(dataset_name), by_image, cfg.TEST.NUM_OVERLAYS):
        path = os.path.join(out_dir, f"{d.get('volume_id', 'image')}_{d.get('slice_index', d['image_id']):04d}.png")
        draw_overlay(d, by_image.get(d["image_id"], []), path, cfg.TEST.OVERLAY_SCORE_THRESH)
        paths.append(path)
    return paths
