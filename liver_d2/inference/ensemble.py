"""Ensembles of slice models (for example axial + coronal + sagittal) fused in 3D.

Every member predicts the same scan along its own axis (its config's INPUT.SLICE_AXIS);
their 3D lesions, all in the scan's canonical voxel grid, are fused by Weighted Boxes
Fusion (Solovyev et al., 2021) in 3D: lesions are taken by falling score, each joins the
cluster whose fused box overlaps it most, by 3D IoU >= ``iou_thresh``, among clusters
holding no lesion of the same model yet (else it starts one; a model's own lesions stay
apart, so an ensemble of identical models changes nothing), a
cluster's box is the score-weighted mean of its members' boxes, and its score is the
weighted mean over *all* members of each member's best score there (0 where a member
found nothing), so agreement raises confidence and a lone finding is discounted.
Written here rather than taken from ``ensemble-boxes`` (which has a 3D WBF) because that
package pulls numba and llvmlite (~40 MB) for a short loop and wants [0, 1] coordinates.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import numpy as np

from liver_d2.data.slicing import voxel_box_to_world
from liver_d2.data.volumes import Volume
from liver_d2.evaluation.lesion_metrics import box_iou_3d
from liver_d2.inference.predictor import VolumePrediction, VolumePredictor, load_scan

DEFAULT_FUSION_IOU = 0.2


def fuse_lesions(members: Sequence[list[dict]], weights: Optional[Sequence[float]] = None,
                 iou_thresh: float = DEFAULT_FUSION_IOU, affine: Optional[np.ndarray] = None) -> list[dict]:
    """3D Weighted Boxes Fusion of the lesion lists of several models (see module doc)."""
    weights = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    items = sorted(((l["max_score"], m, l) for m, lesions in enumerate(members) for l in lesions),
                   key=lambda t: -t[0])
    clusters: list[dict] = []
    for score, m, lesion in items:
        box = np.asarray(lesion["box"], dtype=np.float64)
        best = -1
        if clusters:
            iou = box_iou_3d(box[None], np.stack([c["box"] for c in clusters]))[0]
            iou[[m in {mm for _, mm, _ in c["members"]} for c in clusters]] = -1.0  # one lesion per model
            best = int(np.argmax(iou))
        if best >= 0 and iou[best] >= iou_thresh:
            cluster = clusters[best]
            cluster["members"].append((score, m, lesion))
            w = np.array([s * weights[mm] for s, mm, _ in cluster["members"]])
            cluster["box"] = np.tensordot(w, np.stack([np.asarray(l["box"]) for _, _, l in cluster["members"]]),
                                          axes=1) / w.sum()
        else:
            clusters.append({"box": box, "members": [(score, m, lesion)]})
    fused = []
    for cluster in clusters:
        best_per_member = {}
        for score, m, _ in cluster["members"]:
            best_per_member[m] = max(best_per_member.get(m, 0.0), score)
        fused_score = sum(weights[m] * s for m, s in best_per_member.items()) / weights.sum()
        scores = np.array([s for s, _, _ in cluster["members"]])
        lesion = {
            "box": cluster["box"].tolist(),
            "max_score": float(fused_score),
            "mean_score": float(scores.mean()),
            "longest_diameter_mm": float(np.average([l["longest_diameter_mm"] for _, _, l in cluster["members"]],
                                                    weights=scores)),
            "num_models": len(best_per_member),
            "members": [{"model": int(m), "lesion": l.get("lesion"), "score": float(s)} for s, m, l in cluster["members"]],
        }
        if affine is not None:
            lesion["world_box_mm"] = voxel_box_to_world(cluster["box"], affine).tolist()
        fused.append(lesion)
    fused.sort(key=lambda l: -l["max_score"])
    for i, lesion in enumerate(fused, start=1):
        lesion["lesion"] = i
    return fused


def axial_slice_boxes(lesion: dict, score: float) -> list[dict]:
    """A fused lesion's 3D box cut into axial slice boxes (axial display: cols x, rows y),
    so fused findings are drawn and listed like single-model ones."""
    (x0, y0, z0), (x1, y1, z1) = lesion["box"]
    return [{"slice_index": int(k), "box": [x0, y0, x1, y1], "score": score}
            for k in range(int(np.floor(z0)), int(np.ceil(z1)))]


class EnsemblePredictor:
    """Several VolumePredictors (e.g. one per slice axis) on one scan, fused in 3D."""

    def __init__(self, predictors: Sequence[VolumePredictor], weights: Optional[Sequence[float]] = None,
                 iou_thresh: float = DEFAULT_FUSION_IOU):
        self.predictors = list(predictors)
        self.weights = weights
        self.iou_thresh = iou_thresh

    def predict(self, scan: Union[str, Volume], liver_mask: Union[str, np.ndarray, None] = None,
                ) -> tuple[VolumePrediction, list[VolumePrediction]]:
        """The fused prediction (reported along the axial axis) and each member's own."""
        t0 = time.perf_counter()
        volume, liver_mask = load_scan(scan, liver_mask)  # once for all members
        singles = [p.predict(volume, liver_mask) for p in self.predictors]
        lesions = fuse_lesions([s.lesions for s in singles], self.weights, self.iou_thresh, volume.affine)
        detections = []
        for lesion in lesions:
            lesion["slice_boxes"] = axial_slice_boxes(lesion, lesion["max_score"])
            ks = [b["slice_index"] for b in lesion["slice_boxes"]]
            lesion.update(num_slices=len(ks), first_slice=min(ks), last_slice=max(ks))
            detections.extend(lesion["slice_boxes"])
        fused = VolumePrediction(volume=volume, axis="axial", detections=detections, lesions=lesions,
                                 slices_run=sum(s.slices_run for s in singles), seconds=time.perf_counter() - t0,
                                 model={"ensemble": [s.model for s in singles], "fusion": "3D weighted boxes fusion",
                                        "fusion_iou": self.iou_thresh})
        return fused, singles

    def __call__(self, scan, liver_mask=None) -> VolumePrediction:
        return self.predict(scan, liver_mask)[0]
