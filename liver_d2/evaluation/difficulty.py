"""How hard a prepared split is, and what that leaves for a detector's COCO AP.

Why: an accuracy target means little without the share of tumors the scans let anyone
find, and the box precision they let anyone reach. This joins the per-box detectability
(``detectability.py``), the AP ceiling under edge error (``ceiling.py``) and, given a
model's COCO results, which boxes it found and how far its edges were off.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools.coco import COCO

from liver_d2.data.datasets import registered_split_problem
from liver_d2.errors import LiverD2Error
from liver_d2.evaluation.ceiling import coco_box_stats, edge_errors, ignoring, localisation_ceiling
from liver_d2.evaluation.detectability import split_visibility, summarize_visibility

DEFAULT_SIGMAS = (0.25, 0.5, 0.75, 1.0, 1.5)
DEFAULT_MIN_D_PRIMES = (0.0, 2.0, 3.0)


@dataclass
class DifficultyReport:
    dataset: str
    boxes: pd.DataFrame  # one row per ground-truth box: d', contrast, (best IoU)
    visibility: pd.DataFrame  # boxes per d' bin
    ceiling: pd.DataFrame  # COCO stats by (min d' found, edge sigma)
    edges: Optional[pd.DataFrame] = None  # the model's edge errors on boxes it found
    model: Optional[pd.DataFrame] = None  # the model's COCO stats with boxes below a d' cut-off ignored
    failures: list[str] = field(default_factory=list)


def split_gt(dataset_name: str) -> tuple[COCO, str]:
    """COCO ground truth and prepared folder of a registered prepared split."""
    if dataset_name not in DatasetCatalog.list():
        raise LiverD2Error(f"{dataset_name}: not a registered dataset; prepare it (tools/prepare_data.py) "
                           "and pass its name, e.g. liver_phantom_test")
    meta = MetadataCatalog.get(dataset_name)
    problem = registered_split_problem(dataset_name)
    if problem or meta.get("prepared_dir") is None:
        raise LiverD2Error(problem or f"{dataset_name}: not a prepared liver split")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
        coco = COCO(meta.split_json)
    return coco, meta.prepared_dir


def read_predictions(path: str) -> list[dict]:
    """COCO detection results (``coco_instances_results.json``), checked for the keys used."""
    try:
        with open(path) as f:
            predictions = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LiverD2Error(f"{path}: cannot read predictions ({e})") from e
    if not isinstance(predictions, list) or any(not {"image_id", "bbox", "score"} <= set(p) for p in predictions):
        raise LiverD2Error(f"{path}: not COCO detection results (a list of image_id / bbox / score)")
    return predictions


def analyze_split(dataset_name: str, predictions: Optional[list[dict]] = None, num_slices: int = 3,
                  sigmas: Sequence[float] = DEFAULT_SIGMAS, min_d_primes: Sequence[float] = DEFAULT_MIN_D_PRIMES,
                  score_thresh: float = 0.05, repeats: int = 3) -> DifficultyReport:
    """Detectability of every box of a split, AP ceilings, and (with predictions) the
    model's found share per d' bin, its edge errors, and its COCO stats with the boxes
    below each d' cut-off ignored."""
    coco, prepared_dir = split_gt(dataset_name)
    boxes, failures = split_visibility(coco, prepared_dir, num_slices, predictions, score_thresh)
    if boxes.empty:
        raise LiverD2Error(f"{dataset_name}: no tumor boxes could be measured" +
                           (f" ({failures[0]})" if failures else ""))
    d_prime = boxes["d_prime"].fillna(np.inf).to_numpy()  # unmeasured: large tumors, kept as found
    ceilings = []
    for tau in min_d_primes:
        found = set(boxes["ann_id"][d_prime >= tau]) | set(coco.getAnnIds()) - set(boxes["ann_id"])
        table = localisation_ceiling(coco, sigmas, repeats, found=found)
        ceilings.append(table.assign(min_d_prime=tau, recall=len(found) / len(coco.getAnnIds())))
    ceiling = pd.concat(ceilings).reset_index().set_index(["min_d_prime", "sigma_px"])
    edges = model = None
    if predictions:
        edges = edge_errors(coco, [p for p in predictions if p["score"] >= score_thresh])
        model = pd.DataFrame([{"min_d_prime": tau, "boxes_ignored": int((d_prime < tau).sum()),
                               **coco_box_stats(ignoring(coco, set(boxes["ann_id"][d_prime < tau])), predictions)}
                              for tau in min_d_primes]).set_index("min_d_prime")
    return DifficultyReport(dataset_name, boxes, summarize_visibility(boxes), ceiling, edges, model, failures)


def edge_summary(edges: pd.DataFrame) -> pd.DataFrame:
    """Per edge: mean (bias), SD and RMS of the signed error in px, on COCO-small and all boxes."""
    rows = {}
    for name, part in (("small", edges[edges["area"] < 32**2]), ("all", edges)):
        for edge in ("left", "top", "right", "bottom"):
            e = part[edge]
            rows[(name, edge)] = {"boxes": len(e), "mean_px": e.mean(), "sd_px": e.std(),
                                  "rms_px": float(np.sqrt((e**2).mean())) if len(e) else np.nan}
    return pd.DataFrame(rows).T


def format_report(report: DifficultyReport) -> str:
    """The printed summary: d' bins, ceilings, edge errors."""
    lines = [f"{report.dataset}: {len(report.boxes)} boxes; detectability d' (2.5D footprint-mean observer)",
             report.visibility.round(3).to_string(), "",
             "COCO ceiling: perfect ranking, no false positives, boxes with d' >= min_d_prime found,"
             " edges off by N(0, sigma) px", report.ceiling.round(3).to_string()]
    if report.model is not None:
        lines += ["", "the model's COCO stats, boxes below min_d_prime ignored (COCO's crowd rule)",
                  report.model.round(3).to_string()]
    if report.edges is not None:
        lines += ["", f"model's edge errors (prediction - truth, px) on {len(report.edges)} boxes found at IoU >= 0.5",
                  edge_summary(report.edges).round(2).to_string()]
    return "\n".join(lines)


def write_report(report: DifficultyReport, out_dir: str) -> list[str]:
    """CSV tables and difficulty.png into ``out_dir``; the paths written."""
    from liver_d2.evaluation.plots import plot_difficulty  # matplotlib only when writing

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("boxes.csv", "visibility.csv", "ceiling.csv")]
    report.boxes.to_csv(paths[0], index=False)
    report.visibility.to_csv(paths[1])
    report.ceiling.to_csv(paths[2])
    if report.edges is not None:
        paths.append(os.path.join(out_dir, "edge_errors.csv"))
        report.edges.to_csv(paths[-1], index=False)
        paths.append(os.path.join(out_dir, "model_by_min_d_prime.csv"))
        report.model.to_csv(paths[-1])
    paths.append(plot_difficulty(report.boxes, report.ceiling, os.path.join(out_dir, "difficulty.png")))
    return paths
