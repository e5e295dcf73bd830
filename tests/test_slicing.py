"""Slices in display orientation, and one box per 2D tumor component."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from liver_d2.data.slicing import component_boxes, slice_geometry, slice_stack
from liver_d2.errors import LiverD2Error


def stack_of(*slices: np.ndarray) -> np.ndarray:
    return np.stack(slices).astype(bool)


def test_touching_tumors_follow_connectivity() -> None:
    img = np.zeros((10, 12), bool)
    img[1:4, 1:4] = True  # two squares touching at one corner
    img[4:6, 4:7] = True
    boxes8, _ = component_boxes(stack_of(img), connectivity=8)
    boxes4, _ = component_boxes(stack_of(img), connectivity=4)
    assert [b.bbox for b in boxes8] == [[1, 1, 6, 5]]
    assert sorted(b.bbox for b in boxes4) == [[1, 1, 3, 3], [4, 4, 3, 2]]
    assert sorted(b.area for b in boxes4) == [6, 9]


def test_side_by_side_tumors_merge_into_one_box() -> None:
    img = np.zeros((8, 8), bool)
    img[2:5, 1:3] = True
    img[2:5, 3:6] = True  # sharing an edge: one component in both connectivities
    assert len(component_boxes(stack_of(img), connectivity=4)[0]) == 1


def test_one_pixel_component_and_size_filter() -> None:
    img = np.zeros((6, 6), bool)
    img[0, 5] = True
    img[2:5, 1:4] = True
    boxes, dropped = component_boxes(stack_of(img))
    assert dropped == 0
    single = [b for b in boxes if b.area == 1][0]
    assert single.bbox == [5, 0, 1, 1]  # XYWH covering the whole pixel
    boxes, dropped = component_boxes(stack_of(img), min_pixels=2)
    assert dropped == 1 and [b.area for b in boxes] == [9]
    # 9 pixels at 0.5 x 0.5 mm = 2.25 mm²: a 3 mm² minimum drops it as well
    boxes, dropped = component_boxes(stack_of(img), min_area_mm2=3.0, pixel_spacing=(0.5, 0.5))
    assert dropped == 2 and boxes == []


def test_components_never_link_across_slices() -> None:
    a = np.zeros((5, 5), bool)
    a[1:3, 1:3] = True
    boxes, _ = component_boxes(stack_of(np.zeros((5, 5)), a, a))
    assert [b.slice_index for b in boxes] == [1, 2]


def test_rle_is_the_component_mask() -> None:
    img = np.zeros((9, 7), bool)
    img[2:6, 3] = True
    img[4, 2:5] = True
    (box,) = component_boxes(stack_of(img))[0]
    decoded = mask_utils.decode({"size": box.rle["size"], "counts": box.rle["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), img)
    assert box.area == img.sum()


def test_slice_orientation_is_radiological() -> None:
    vol = np.zeros((4, 3, 5), np.int16)  # LPS: x→left, y→posterior, z→superior
    vol[3, 0, 4] = 7  # most left, most anterior, most superior voxel
    axial = slice_stack(vol, "axial")[4]
    assert axial.shape == (3, 4) and axial[0, 3] == 7  # top row (anterior), right column (left)
    coronal = slice_stack(vol, "coronal")[0]
    assert coronal.shape == (5, 4) and coronal[0, 3] == 7  # superior at the top
    sagittal = slice_stack(vol, "sagittal")[3]
    assert sagittal.shape == (5, 3) and sagittal[0, 0] == 7  # superior top, anterior left
    assert slice_geometry((0.7, 0.8, 2.5), "coronal") == ((2.5, 0.7), 0.8)


def test_bad_axis_and_connectivity() -> None:
    with pytest.raises(LiverD2Error, match="axial, coronal, sagittal"):
        slice_stack(np.zeros((2, 2, 2)), "oblique")
    with pytest.raises(LiverD2Error, match="4 or 8"):
        component_boxes(stack_of(np.ones((2, 2))), connectivity=6)
