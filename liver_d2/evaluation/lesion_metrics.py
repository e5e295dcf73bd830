"""Lesion-level (3D) detection metrics: FROC, CPM, 3D AP and recall by lesion size.

Predicted and ground-truth lesions (see :mod:`liver_d2.lesions`) are matched per volume
by the IoU of their 3D boxes, at 0.1 by default as in nnDetection and LUNA16-style
evaluation: a lesion detector is judged on finding the tumor, not on tracing its extent.
Written here rather than taken from MONAI (``monai.metrics.froc``) because that would add
MONAI as a dependency for a few lines, and its FROC takes pre-matched probabilities, not
3D boxes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from liver_d2.lesions import box_iou

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per volume
DEFAULT_IOU = 0.1
SIZE_BUCKETS = (("<10mm", 0.0, 10.0), ("10-20mm", 10.0, 20.0), (">20mm", 20.0, float("inf")))


def box_iou_3d(a, b) -> np.ndarray:
    """Pairwise IoU of (N, 2, 3) and (M, 2, 3) boxes given as [[lo xyz], [hi xyz]]."""
    return box_iou(a, b, 3)


def match_volume(predictions: list[dict], truths: list[dict], iou_thresh: float = DEFAULT_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy matching in one volume, highest score first, each truth matched at most once.

    Returns (scores, is_true_positive, matched truth index or -1) over the predictions.
    """
    scores = np.array([p["max_score"] for p in predictions], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros(len(predictions), dtype=bool)
    matched = np.full(len(predictions), -1)
    if predictions and truths:
        iou = box_iou_3d([p["box"] for p in predictions], [t["box"] for t in truths])
        taken = np.zeros(len(truths), dtype=bool)
        for i in order:
            candidates = np.where(taken, -1.0, iou[i])
            j = int(np.argmax(candidates))
            if candidates[j] >= iou_thresh:
                tp[i], matched[i], taken[j] = True, j, True
    return scores, tp, matched


def _operating_points(scores: np.ndarray, tp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative TP and FP counts at each distinct score threshold (ties count together)."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], tp[order]
    ctp, cfp = np.cumsum(t), np.cumsum(~t)
    last_of_tie = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
    return ctp[last_of_tie], cfp[last_of_tie]


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (all-points interpolation, as PASCAL VOC 2010+)."""
    r = np.concatenate([[0.0], recall])
    p = np.concatenate([[0.0], precision])
    p = np.maximum.accumulate(p[::-1])[::-1]
    return float(np.sum((r[1:] - r[:-1]) * p[1:]))


@dataclass
class LesionMetrics:
    """Summary numbers plus the curves and tables behind them."""

    summary: dict
    froc: pd.DataFrame  # fp_per_volume, sensitivity at each threshold
    pr: pd.DataFrame  # recall, precision at each threshold
    per_volume: pd.DataFrame
    per_lesion: pd.DataFrame  # one row per ground-truth lesion
    fp_rates: tuple = field(default=FROC_FP_RATES)


def evaluate_lesions(volumes: dict[str, tuple[list[dict], list[dict]]], iou_thresh: float = DEFAULT_IOU,
                     fp_rates: tuple = FROC_FP_RATES) -> LesionMetrics:
    """Lesion metrics over volumes: ``{volume_id: (predicted lesions, ground-truth lesions)}``.

    Predicted lesions need ``box`` and ``max_score``; ground-truth lesions ``box`` and
    ``diameter_mm``. Sensitivity at a false-positive rate is the highest sensitivity at a
    score threshold whose false positives per volume do not exceed it (0 if none does);
    CPM is their mean.
    """
    all_scores, all_tp, vol_rows, lesion_rows = [], [], [], []
    for vid, (preds, truths) in volumes.items():
        scores, tp, matched = match_volume(preds, truths, iou_thresh)
        all_scores.append(scores)
        all_tp.append(tp)
        best = {int(j): float(scores[i]) for i, j in enumerate(matched) if j >= 0}
        for j, t in enumerate(truths):
            lesion_rows.append({"volume_id": vid, "lesion": t.get("lesion", j + 1), "diameter_mm": t["diameter_mm"],
                                "detected": j in best, "score": best.get(j, np.nan)})
        vol_rows.append({"volume_id": vid, "truths": len(truths), "predictions": len(preds),
                         "tp": int(tp.sum()), "fp": int((~tp).sum()), "fn": len(truths) - int(tp.sum())})
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp) if all_tp else np.zeros(0, bool)
    n_truth = sum(len(t) for _, t in volumes.values())
    n_vol = max(len(volumes), 1)
    ctp, cfp = _operating_points(scores, tp)
    sensitivity = ctp / n_truth if n_truth else np.zeros(len(ctp))
    fppv = cfp / n_vol
    precision = ctp / np.maximum(ctp + cfp, 1)
    summary: dict = {}
    for rate in fp_rates:
        ok = fppv <= rate
        summary[f"sens@{rate:g}"] = float(sensitivity[ok].max()) if ok.any() else 0.0
    summary["CPM"] = float(np.mean([summary[f"sens@{r:g}"] for r in fp_rates]))
    summary["AP3D"] = average_precision(sensitivity, precision) if n_truth else float("nan")
    per_lesion = pd.DataFrame(lesion_rows, columns=["volume_id", "lesion", "diameter_mm", "detected", "score"])
    for name, lo, hi in SIZE_BUCKETS:
        in_bucket = per_lesion[(per_lesion.diameter_mm >= lo) & (per_lesion.diameter_mm < hi)]
        summary[f"recall_{name}"] = float(in_bucket.detected.mean()) if len(in_bucket) else float("nan")
    summary["recall"] = float(per_lesion.detected.mean()) if len(per_lesion) else float("nan")
    summary.update({"lesions": n_truth, "volumes": len(volumes), "predictions": int(len(scores)),
                    "iou_thresh": iou_thresh})
    return LesionMetrics(
        summary=summary,
        froc=pd.DataFrame({"fp_per_volume": fppv, "sensitivity": sensitivity}),
        pr=pd.DataFrame({"recall": sensitivity, "precision": precision}),
        per_volume=pd.DataFrame(vol_rows, columns=["volume_id", "truths", "predictions", "tp", "fp", "fn"]),
        per_lesion=per_lesion,
        fp_rates=tuple(fp_rates),
    )


def write_lesion_metrics(metrics: LesionMetrics, out_dir: str) -> list[str]:
    """summary JSON, per-volume / per-lesion / curve CSVs and FROC + PR PNG plots."""
    import json
    import os

    from liver_d2.evaluation.plots import plot_froc, plot_pr

    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in
             ("lesion_metrics.json", "lesions_per_volume.csv", "lesions_per_truth.csv", "froc.csv", "pr.csv",
              "froc.png", "pr.png")}
    with open(paths["lesion_metrics.json"], "w") as f:
        json.dump(metrics.summary, f, indent=2)
    metrics.per_volume.to_csv(paths["lesions_per_volume.csv"], index=False)
    metrics.per_lesion.to_csv(paths["lesions_per_truth.csv"], index=False)
    metrics.froc.to_csv(paths["froc.csv"], index=False)
    metrics.pr.to_csv(paths["pr.csv"], index=False)
    plot_froc({"model": metrics}, paths["froc.png"])
    plot_pr({"model": metrics}, paths["pr.png"])
    return list(paths.values())


def format_summary(summary: dict) -> str:
    """One printable block: CPM, sensitivities, AP3D and recall by size."""
    keys = [k for k in summary if k.startswith("sens@")] + ["CPM", "AP3D", "recall"] + \
        [f"recall_{n}" for n, _, _ in SIZE_BUCKETS]
    head = f"lesion-level, 3D IoU >= {summary['iou_thresh']:g}: {summary['lesions']} lesions in {summary['volumes']} volumes, {summary['predictions']} predicted"
    return head + "\n" + pd.DataFrame([{k: summary[k] for k in keys}]).to_string(index=False, float_format=lambda v: f"{v:.3f}")
