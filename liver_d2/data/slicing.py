"""Volume → 2D slices along an axis, and tumor components → boxes.

Slices come out in display orientation (rows top to bottom, columns left to right as a
radiologist reads them), so stored PNGs, boxes and overlays all agree with each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

from liver_d2.errors import LiverD2Error

AXES = ("axial", "coronal", "sagittal")
TUMOR = 2
LIVER = 1


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise LiverD2Error(f"unknown slice axis {axis!r}: choose one of {', '.join(AXES)}")
    return axis


def slice_stack(array: np.ndarray, axis: str) -> np.ndarray:
    """View of an LPS (x, y, z) array as (K, rows, cols) display-oriented slices.

    axial: rows run anterior→posterior, cols patient right→left;
    coronal: rows superior→inferior, cols right→left; sagittal: rows superior→inferior,
    cols anterior→posterior.
    """
    check_axis(axis)
    if axis == "axial":
        return array.transpose(2, 1, 0)
    if axis == "coronal":
        return array.transpose(1, 2, 0)[:, ::-1, :]
    return array.transpose(0, 2, 1)[:, ::-1, :]


def slice_geometry(spacing: tuple[float, float, float], axis: str) -> tuple[tuple[float, float], float]:
    """(row spacing, column spacing) in mm and the slice thickness (spacing across slices)."""
    sx, sy, sz = spacing
    return {"axial": ((sy, sx), sz), "coronal": ((sz, sx), sy), "sagittal": ((sz, sy), sx)}[
        check_axis(axis)
    ]


def connectivity_structure(connectivity: int) -> np.ndarray:
    """2D neighbourhood (4 or 8) embedded in 3D with no links across slices."""
    if connectivity not in (4, 8):
        raise LiverD2Error(f"connectivity must be 4 or 8, got {connectivity}")
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    return structure


@dataclass
class TumorBox:
    """One 2D connected tumor component on one slice."""

    slice_index: int
    bbox: list[int]  # XYWH in pixel-edge coordinates: the box covers whole pixels
    area: int  # pixels in the component (COCO's ``area``, used for small/medium/large)
    rle: dict  # COCO RLE of the component mask, counts as str (JSON-ready)


def component_boxes(
    tumor_stack: np.ndarray,
    connectivity: int = 8,
    min_pixels: int = 0,
    min_area_mm2: float = 0.0,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
) -> tuple[list[TumorBox], int]:
    """All 2D tumor components of a (K, H, W) boolean stack, one box each.

    Labelling the whole stack at once with a structure that never links slices gives every
    slice's 2D components in one scipy call. Components smaller than ``min_pixels`` or
    ``min_area_mm2`` are dropped; the count of dropped ones is returned for the summary.
    """
    # Label only the slices that hold tumor: most of a volume has none.
    with_tumor = np.flatnonzero(tumor_stack.any(axis=(1, 2)))
    if len(with_tumor) == 0:
        return [], 0
    labels, count = ndimage.label(tumor_stack[with_tumor], structure=connectivity_structure(connectivity))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    pixel_mm2 = float(pixel_spacing[0] * pixel_spacing[1])
    boxes: list[TumorBox] = []
    dropped = 0
    for index, (obj, size) in enumerate(zip(ndimage.find_objects(labels), sizes), start=1):
        if size < min_pixels or size * pixel_mm2 < min_area_mm2:
            dropped += 1
            continue
        j = obj[0].start
        k = int(with_tumor[j])
        rows, cols = obj[1], obj[2]
        mask = np.zeros(tumor_stack.shape[1:], dtype=np.uint8, order="F")
        mask[rows, cols] = labels[j, rows, cols] == index
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        boxes.append(
            TumorBox(
                slice_index=k,
                bbox=[int(cols.start), int(rows.start), int(cols.stop - cols.start), int(rows.stop - rows.start)],
                area=int(size),
                rle=rle,
            )
        )
    return boxes, dropped


def coco_size_bucket(area: float) -> str:
    """COCO's area ranges: small < 32², medium < 96², large otherwise."""
    if area < 32**2:
        return "small"
    if area < 96**2:
        return "medium"
    return "large"


def slice_box_to_voxels(box: Sequence[float], k: int, axis: str, shape: Sequence[int]) -> np.ndarray:
    """A slice box (x0, y0, x1, y1 in pixel-edge coordinates of slice ``k`` as ``slice_stack``
    shows it) as a 3D box in edge coordinates of the LPS (x, y, z) array: [[lo...], [hi...]].

    Voxel i covers [i, i+1) on each axis, so the box maps exactly, including the rows
    that ``slice_stack`` flips (z runs upwards, rows run downwards: z = depth - row).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    depth = float(shape[2])
    if check_axis(axis) == "axial":  # rows = y, cols = x, slices = z
        lo, hi = (x0, y0, k), (x1, y1, k + 1)
    elif axis == "coronal":  # rows = flipped z, cols = x, slices = y
        lo, hi = (x0, k, depth - y1), (x1, k + 1, depth - y0)
    else:  # sagittal: rows = flipped z, cols = y, slices = x
        lo, hi = (k, x0, depth - y1), (k + 1, x1, depth - y0)
    return np.array([lo, hi], dtype=np.float64)


def voxel_box_to_world(box: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Edge-coordinate voxel box [[lo], [hi]] -> axis-aligned world box (RAS mm, the
    NIfTI affine's space) [[min], [max]] over its eight corners. The affine maps voxel
    *centres*, so edges sit half a voxel before them."""
    corners = np.array([[box[i, 0], box[j, 1], box[m, 2]] for i in (0, 1) for j in (0, 1) for m in (0, 1)]) - 0.5
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return np.stack([world.min(axis=0), world.max(axis=0)])


def slice_boxes(stack: np.ndarray) -> list[Optional[list[int]]]:
    """Per slice of a (K, H, W) boolean stack, the XYXY pixel-edge box of all True pixels
    (None for an empty slice): the liver region the two-stage detector crops to."""
    rows = stack.any(axis=2)  # (K, H)
    cols = stack.any(axis=1)  # (K, W)
    out: list[Optional[list[int]]] = []
    for r, c in zip(rows, cols):
        if not r.any():
            out.append(None)
            continue
        ys, xs = np.flatnonzero(r), np.flatnonzero(c)
        out.append([int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1])
    return out
