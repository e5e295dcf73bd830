"""Files a prediction run leaves for people and programs: per-volume JSON, one CSV row
per lesion, an optional NIfTI map of the lesion boxes on the input's grid, and PNG
overlays of the top findings plus one montage per volume."""
from __future__ import annotations

import json
import os
from typing import Sequence

import cv2
import nibabel as nib
import numpy as np

from liver_d2.data.channels import window_hu
from liver_d2.data.slicing import slice_stack
from liver_d2.data.volumes import from_canonical
from liver_d2.evaluation.overlays import DISPLAY_WINDOW
from liver_d2.inference.predictor import VolumePrediction

CSV_COLUMNS = ["volume_id", "lesion", "max_score", "mean_score", "num_slices", "first_slice", "last_slice",
               "longest_diameter_mm", "x0", "y0", "z0", "x1", "y1", "z1",
               "world_min_x", "world_min_y", "world_min_z", "world_max_x", "world_max_y", "world_max_z"]
OVERLAY_MIN_SIDE = 512  # small slices are enlarged so boxes and scores stay legible


def write_json(prediction: VolumePrediction, path: str, include_patient_fields: bool = False) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(prediction.to_record(include_patient_fields), f, indent=1)
    return path


def lesion_rows(prediction: VolumePrediction, min_score: float = 0.0) -> list[dict]:
    """One flat row per lesion scoring at least ``min_score`` (the run's CSV)."""
    rows = []
    for lesion in prediction.lesions:
        if lesion["max_score"] < min_score:
            continue
        (x0, y0, z0), (x1, y1, z1) = lesion["box"]
        row = {"volume_id": prediction.volume.volume_id, "x0": x0, "y0": y0, "z0": z0, "x1": x1, "y1": y1, "z1": z1}
        row.update({k: lesion[k] for k in ("lesion", "max_score", "mean_score", "num_slices", "first_slice",
                                           "last_slice", "longest_diameter_mm")})
        if "world_box_mm" in lesion:
            (wx0, wy0, wz0), (wx1, wy1, wz1) = lesion["world_box_mm"]
            row.update(world_min_x=wx0, world_min_y=wy0, world_min_z=wz0, world_max_x=wx1, world_max_y=wy1,
                       world_max_z=wz1)
        rows.append(row)
    return rows


def box_label_map(prediction: VolumePrediction, min_score: float = 0.0) -> np.ndarray:
    """uint16 LPS map: each lesion's 3D box painted with its number (higher scores on top)."""
    out = np.zeros(prediction.volume.shape, dtype=np.uint16)
    for lesion in sorted(prediction.lesions, key=lambda l: l["max_score"]):
        if lesion["max_score"] < min_score:
            continue
        lo, hi = (np.asarray(v) for v in lesion["box"])
        lo = np.clip(np.floor(lo).astype(int), 0, None)
        hi = np.minimum(np.ceil(hi).astype(int), prediction.volume.shape)
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = lesion["lesion"]
    return out


def write_box_nifti(prediction: VolumePrediction, path: str, min_score: float = 0.0) -> str:
    """The box map on the input's own grid and affine (reoriented back from LPS)."""
    volume = prediction.volume
    data = box_label_map(prediction, min_score)
    affine = volume.affine
    if volume.source_affine is not None:
        data, affine = from_canonical(data, volume.source_affine), volume.source_affine
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return path


def render_slice(hu: np.ndarray, boxes: Sequence[Sequence[float]], scores: Sequence[float],
                 truth: Sequence[Sequence[float]] = (), title: str = "") -> np.ndarray:
    """Windowed slice (BGR uint8) with predicted boxes in red with scores, truth in green.
    cv2 rather than matplotlib: a montage of many slices is drawn in milliseconds."""
    scale = max(1, int(np.ceil(OVERLAY_MIN_SIDE / max(hu.shape))))
    grey = (window_hu(hu, *DISPLAY_WINDOW) * 255).astype(np.uint8)
    img = cv2.cvtColor(cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
    for box in truth:
        x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 220, 0), 1)
    for box, score in zip(boxes, scores):
        x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 255), 1)
        cv2.putText(img, f"{score:.2f}", (x0, max(y0 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 255), 1, cv2.LINE_AA)
    if title:
        cv2.putText(img, title, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def write_overlays(prediction: VolumePrediction, out_dir: str, top: int = 6, min_score: float = 0.3) -> list[str]:
    """PNG of the best slice of each of the ``top`` findings, and ``<id>_montage.png``.

    Each picture shows every detection on that slice at or above ``min_score``. A scan
    with no finding gets a montage of its middle slice, so every volume has a picture.
    """
    volume = prediction.volume
    stack = slice_stack(volume.hu, prediction.axis)
    lesions = [l for l in prediction.lesions if l["max_score"] >= min_score][:top]
    slices = []
    for lesion in lesions:
        best = max(lesion["slice_boxes"], key=lambda b: b["score"])["slice_index"]
        if best not in slices:
            slices.append(best)
    os.makedirs(out_dir, exist_ok=True)
    paths, tiles = [], []
    for k in slices or [stack.shape[0] // 2]:
        dets = [d for d in prediction.detections if d["slice_index"] == k and d["score"] >= min_score]
        tile = render_slice(stack[k], [d["box"] for d in dets], [d["score"] for d in dets],
                            title=f"{volume.volume_id} {prediction.axis} {k}")
        tiles.append(tile)
        if slices:
            paths.append(os.path.join(out_dir, f"{volume.volume_id}_{prediction.axis}_{k:04d}.png"))
            cv2.imwrite(paths[-1], tile)
    paths.append(os.path.join(out_dir, f"{volume.volume_id}_montage.png"))
    cv2.imwrite(paths[-1], montage(tiles))
    return paths


def montage(tiles: list[np.ndarray], columns: int = 3) -> np.ndarray:
    """Tiles (same size) in a grid, black where the last row is short."""
    h, w = tiles[0].shape[:2]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile[:h, :w]
    return grid
