"""The COCO AP a perfect detector would get if its box edges were off by a few tenths of
a pixel: how much of the AP scale tiny tumors leave to localisation alone.

Why: AP averages IoU thresholds 0.50-0.95, and on a 3 x 3 px box one pixel of error on one
edge already gives IoU 0.67. Blur, partial volume and noise make a small tumor's edge
uncertain by about a pixel, so APs has a ceiling that no ranking or recall can lift. Each
ground-truth box is "detected" once, every edge moved by Gaussian noise of ``sigma`` px,
and scored by its IoU (the best ranking there is), then COCO evaluation runs unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Container, Iterable, Optional

import numpy as np
import pandas as pd
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from liver_d2.lesions import box_iou

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def jittered_detections(coco_gt: COCO, sigma_px: float, rng: np.random.Generator,
                        found: Optional[Container[int]] = None) -> list[dict]:
    """One detection per ground-truth box (per box in ``found``, if given: annotation ids),
    edges moved by N(0, sigma) px, kept inside the image and at least 0.5 px wide; its
    score is its IoU with the box it came from."""
    out = []
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds()):
        if found is not None and ann["id"] not in found:
            continue
        img = coco_gt.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        gt = np.array([x, y, x + w, y + h], dtype=np.float64)
        box = gt + rng.normal(0.0, sigma_px, 4)
        box[[0, 2]] = np.clip(box[[0, 2]], 0, img["width"])
        box[[1, 3]] = np.clip(box[[1, 3]], 0, img["height"])
        box[2] = max(box[2], min(box[0] + 0.5, img["width"]))
        box[0] = min(box[0], box[2] - 0.5)
        box[3] = max(box[3], min(box[1] + 0.5, img["height"]))
        box[1] = min(box[1], box[3] - 0.5)
        iou = float(box_iou(gt, box, 2)[0, 0])
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": iou})
    return out


def coco_box_stats(coco_gt: COCO, detections: list[dict]) -> dict[str, float]:
    """COCO AP, AP50, AP75, APs, APm, APl (fractions; NaN where a size has no boxes)."""
    if not detections:
        return {k: 0.0 for k in COCO_STATS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) if v >= 0 else float("nan")) for k, v in zip(COCO_STATS, ev.stats[:6])}


def ignoring(coco_gt: COCO, ann_ids: Container[int]) -> COCO:
    """A copy of the ground truth with the given boxes marked ``iscrowd``: COCO evaluation
    then neither misses them nor counts a detection inside them as false (its ignore rule)."""
    data = copy.deepcopy(coco_gt.dataset)
    for ann in data["annotations"]:
        if ann["id"] in ann_ids:
            ann["iscrowd"] = 1
    with contextlib.redirect_stdout(io.StringIO()):
        out = COCO()
        out.dataset = data
        out.createIndex()
    return out


def localisation_ceiling(coco_gt: COCO, sigmas: Iterable[float], repeats: int = 3, seed: int = 0,
                         found: Optional[Container[int]] = None) -> pd.DataFrame:
    """Median over ``repeats`` draws of the COCO stats of perfectly ranked boxes without
    false positives, one row per edge error ``sigma`` (px); every box is found unless
    ``found`` names the annotation ids that are."""
    rows = []
    for sigma in sigmas:
        draws = [coco_box_stats(coco_gt, jittered_detections(coco_gt, sigma, np.random.default_rng([seed, r]), found))
                 for r in range(repeats)]
        rows.append({"sigma_px": float(sigma), **pd.DataFrame(draws).median().to_dict()})
    return pd.DataFrame(rows).set_index("sigma_px")


def edge_errors(coco_gt: COCO, detections: list[dict], min_iou: float = 0.5) -> pd.DataFrame:
    """For each ground-truth box, its best-IoU detection at IoU >= ``min_iou``: the signed
    error of each edge in px (prediction minus truth), for the model's localisation."""
    by_image: dict[int, list[list[float]]] = {}
    for d in detections:
        x, y, w, h = d["bbox"]
        by_image.setdefault(int(d["image_id"]), []).append([x, y, x + w, y + h])
    rows = []
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds()):
        preds = np.asarray(by_image.get(ann["image_id"], []), dtype=np.float64).reshape(-1, 4)
        if not len(preds):
            continue
        x, y, w, h = ann["bbox"]
        gt = np.array([x, y, x + w, y + h], dtype=np.float64)
        ious = box_iou(gt, preds, 2)[0]
        best = int(np.argmax(ious))
        if ious[best] >= min_iou:
            err = preds[best] - gt
            rows.append({"image_id": ann["image_id"], "area": ann["area"], "iou": float(ious[best]),
                         "left": err[0], "top": err[1], "right": err[2], "bottom": err[3]})
    return pd.DataFrame(rows, columns=["image_id", "area", "iou", "left", "top", "right", "bottom"])
