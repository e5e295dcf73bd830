"""The one definition of a lesion, for ground truth and for predictions alike.

A ground-truth lesion is a 3D connected component of the tumor label (one connectivity
setting, so "a tumor" means the same thing in statistics and in metrics). A predicted
lesion is a group of slice detections linked across neighbouring slices. Both carry a 3D
box in voxel-edge coordinates of the canonical LPS array (voxel i covers [i, i+1)), so
they compare directly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from liver_d2.data.slicing import slice_box_to_voxels, slice_geometry, voxel_box_to_world

LESION_CONNECTIVITY = 26  # 3D full connectivity: diagonal neighbours belong to one lesion


def label_lesions(tumor_mask: np.ndarray, connectivity: int = LESION_CONNECTIVITY) -> tuple[np.ndarray, int]:
    """Label 3D tumor components (6, 18 or 26 connectivity)."""
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    return ndimage.label(tumor_mask, structure=ndimage.generate_binary_structure(3, rank))


def bounding_slices(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel. Each axis is found on the box narrowed so
    far, so later projections read only a sliver of the volume (faster than find_objects)."""
    box = [slice(None)] * mask.ndim
    for axis in range(mask.ndim):
        view = mask[tuple(box)]
        hits = np.flatnonzero(view.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box[axis] = slice(int(hits[0]), int(hits[-1]) + 1)
    return tuple(box)


def lesion_table(hu: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float],
                 tumor_value: int = 2, liver_value: int = 1) -> pd.DataFrame:
    """One row per ground-truth lesion: voxels, volume, equivalent diameter, contrast to liver.

    Equivalent diameter is the diameter of the sphere with the lesion's volume; contrast is
    the lesion's mean HU minus the mean HU of the tumor-free liver of the same scan.
    """
    tumor = label == tumor_value
    columns = ["lesion", "voxels", "volume_mm3", "diameter_mm", "mean_hu", "contrast_hu"]
    if not tumor.any():
        return pd.DataFrame(columns=columns)
    # Label inside the tumors' bounding box only: a fraction of the volume, same components.
    crop = bounding_slices(tumor)
    lesions, count = label_lesions(tumor[crop])
    index = np.arange(1, count + 1)
    voxels = np.bincount(lesions.ravel(), minlength=count + 1)[1:]
    mean_hu = ndimage.mean(hu[crop], lesions, index)
    liver = label == liver_value
    liver_mean = float(hu.mean(where=liver, dtype=np.float64)) if liver.any() else float("nan")
    volume_mm3 = voxels * float(np.prod(spacing))
    return pd.DataFrame({
        "lesion": index,
        "voxels": voxels.astype(int),
        "volume_mm3": volume_mm3,
        "diameter_mm": np.cbrt(6.0 * volume_mm3 / np.pi),
        "mean_hu": mean_hu,
        "contrast_hu": np.asarray(mean_hu) - liver_mean,
    })


def ground_truth_lesions(label: np.ndarray, spacing: Sequence[float], tumor_value: int = 2) -> list[dict]:
    """3D tumor components of an LPS label map, each with its voxel-edge box and size."""
    tumor = label == tumor_value
    if not tumor.any():
        return []
    crop = bounding_slices(tumor)
    offset = np.array([c.start for c in crop], dtype=np.float64)
    lesions, count = label_lesions(tumor[crop])
    voxels = np.bincount(lesions.ravel(), minlength=count + 1)[1:]
    voxel_mm3 = float(np.prod(spacing))
    out = []
    for index, obj in enumerate(ndimage.find_objects(lesions), start=1):
        lo = offset + [s.start for s in obj]
        hi = offset + [s.stop for s in obj]
        volume_mm3 = float(voxels[index - 1]) * voxel_mm3
        out.append({
            "lesion": index,
            "box": [lo.tolist(), hi.tolist()],
            "voxels": int(voxels[index - 1]),
            "diameter_mm": float(np.cbrt(6.0 * volume_mm3 / np.pi)),  # equivalent sphere, as lesion_table
        })
    return out


def box_iou(a, b, dims: int) -> np.ndarray:
    """Pairwise IoU of N and M axis-aligned boxes in ``dims`` dimensions, each given as its
    low corner then its high corner: XYXY slice boxes (dims 2) or [[lo xyz], [hi xyz]]
    lesion boxes (dims 3). numpy: slice linking and lesion matching run outside torch."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2, dims)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2, dims)
    lo = np.maximum(a[:, None, 0], b[None, :, 0])
    hi = np.minimum(a[:, None, 1], b[None, :, 1])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    size_a = np.prod(a[:, 1] - a[:, 0], axis=1)
    size_b = np.prod(b[:, 1] - b[:, 0], axis=1)
    union = size_a[:, None] + size_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def link_slice_detections(
    detections: Sequence[dict],
    axis: str,
    shape: Sequence[int],
    spacing: Sequence[float],
    affine: np.ndarray | None = None,
    link_iou: float = 0.1,
    max_gap: int = 1,
) -> list[dict]:
    """Group slice detections ({"slice_index", "box" XYXY, "score"}) into 3D lesions.

    Detections are chained slice by slice: on each slice, the boxes are matched one-to-one
    (Hungarian assignment, scipy) to the open chains whose last box lies 1..1+max_gap
    slices back (a gap of ``max_gap`` slices without a box is bridged), when their 2D IoU
    is >= link_iou; unmatched boxes start new chains. One-to-one links keep two tumors
    apart even where a large low-score box overlaps both. Each chain is a lesion with
    its 3D voxel box (union of its slice boxes), world box in mm (through ``affine``),
    longest in-plane diameter in mm (the longest side of its largest slice box: a box
    bounds, but does not trace, the tumor), number of slices, and max and mean score.
    Lesions come sorted by max score.
    """
    n = len(detections)
    if n == 0:
        return []
    slices = np.array([int(d["slice_index"]) for d in detections])
    boxes = np.array([[float(v) for v in d["box"]] for d in detections]).reshape(n, 4)
    scores = np.array([float(d["score"]) for d in detections])
    chains: list[list[int]] = []
    for k in np.unique(slices):
        here = np.flatnonzero(slices == k)
        here = here[np.argsort(-scores[here], kind="stable")]
        open_chains = [c for c in chains if 1 <= k - slices[c[-1]] <= 1 + max_gap]
        linked = set()
        if open_chains:
            iou = box_iou(boxes[[c[-1] for c in open_chains]], boxes[here], 2)
            gaps = np.array([k - slices[c[-1]] for c in open_chains], dtype=np.float64)
            # prefer the nearest slice among equal overlaps
            rows, cols = linear_sum_assignment(-(iou - 1e-3 * gaps[:, None]))
            for r, c in zip(rows, cols):
                if iou[r, c] >= link_iou:
                    open_chains[r].append(int(here[c]))
                    linked.add(c)
        chains.extend([int(here[c])] for c in range(len(here)) if c not in linked)
    (row_mm, col_mm), _ = slice_geometry(tuple(spacing), axis)
    lesions = []
    for chain in chains:
        members = np.array(chain)
        voxel_boxes = np.stack([slice_box_to_voxels(boxes[i], slices[i], axis, shape) for i in members])
        box3d = np.stack([voxel_boxes[:, 0].min(axis=0), voxel_boxes[:, 1].max(axis=0)])
        sides_mm = np.maximum((boxes[members, 2] - boxes[members, 0]) * col_mm,
                              (boxes[members, 3] - boxes[members, 1]) * row_mm)
        lesion = {
            "box": box3d.tolist(),
            "longest_diameter_mm": float(sides_mm.max()),
            "num_slices": int(len(np.unique(slices[members]))),
            "first_slice": int(slices[members].min()),
            "last_slice": int(slices[members].max()),
            "max_score": float(scores[members].max()),
            "mean_score": float(scores[members].mean()),
            "slice_boxes": [{"slice_index": int(slices[i]), "box": boxes[i].tolist(), "score": float(scores[i])}
                            for i in members[np.argsort(slices[members], kind="stable")]],
        }
        if affine is not None:
            lesion["world_box_mm"] = voxel_box_to_world(box3d, affine).tolist()
        lesions.append(lesion)
    lesions.sort(key=lambda l: -l["max_score"])
    for i, lesion in enumerate(lesions, start=1):
        lesion["lesion"] = i
    return lesions
