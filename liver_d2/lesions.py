"""The one definition of a lesion: a 3D connected component of the tumor label.

Ground-truth lesions (for statistics now, for lesion-level metrics later) all come from
here, with one connectivity setting, so "a tumor" means the same thing everywhere.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

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
