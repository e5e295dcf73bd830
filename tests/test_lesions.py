"""Slice boxes ↔ 3D lesions: voxel mapping per axis, ground-truth components, linking."""
from __future__ import annotations

import numpy as np
import pytest

from liver_d2.data.slicing import AXES, component_boxes, slice_box_to_voxels, slice_stack, voxel_box_to_world
from liver_d2.lesions import ground_truth_lesions, link_slice_detections


def _block_label(shape=(20, 16, 12), lo=(3, 5, 2), hi=(9, 8, 7)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 2
    return label


@pytest.mark.parametrize("axis", AXES)
def test_slice_boxes_map_back_to_the_voxel_block(axis: str) -> None:
    label = _block_label()
    boxes, _ = component_boxes(slice_stack(label == 2, axis))
    union = None
    for b in boxes:
        x, y, w, h = b.bbox
        vox = slice_box_to_voxels([x, y, x + w, y + h], b.slice_index, axis, label.shape)
        union = vox if union is None else np.stack([np.minimum(union[0], vox[0]), np.maximum(union[1], vox[1])])
    assert union.tolist() == [[3, 5, 2], [9, 8, 7]]


def test_ground_truth_lesions_are_3d_components() -> None:
    label = _block_label()
    label[12:14, 1:3, 9:11] = 2  # a second, separate lesion
    lesions = ground_truth_lesions(label, (1.0, 1.0, 2.0))
    boxes = sorted(l["box"] for l in lesions)
    assert boxes == [[[3, 5, 2], [9, 8, 7]], [[12, 1, 9], [14, 3, 11]]]
    voxels = sorted(l["voxels"] for l in lesions)
    assert voxels == [8, 6 * 3 * 5]
    small = min(lesions, key=lambda l: l["voxels"])
    assert small["diameter_mm"] == pytest.approx((6 * 16 / np.pi) ** (1 / 3))  # 8 voxels of 2 mm³


def test_world_box_through_the_affine() -> None:
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -30.0]
    world = voxel_box_to_world(np.array([[0.0, 0.0, 0.0], [4.0, 2.0, 3.0]]), affine)
    # voxel-edge x 0..4 -> centres -0.5..3.5 -> 10 + 0.25 .. 10 - 1.75 mm
    assert world.tolist() == [[8.25, 19.25, -31.0], [10.25, 20.25, -25.0]]


def _det(k, box, score):
    return {"slice_index": k, "box": box, "score": score}


def test_linking_bridges_one_missing_slice_but_not_two() -> None:
    dets = [_det(3, [10, 10, 20, 20], 0.9), _det(5, [11, 10, 21, 20], 0.5),  # gap of one slice
            _det(8, [10, 10, 20, 20], 0.4)]  # two empty slices later: a new lesion
    lesions = link_slice_detections(dets, "axial", (64, 64, 16), (1.0, 1.0, 2.0), max_gap=1)
    assert [(l["first_slice"], l["last_slice"], l["num_slices"]) for l in lesions] == [(3, 5, 2), (8, 8, 1)]
    first = lesions[0]
    assert first["box"] == [[10, 10, 3], [21, 20, 6]]
    assert first["max_score"] == 0.9 and first["mean_score"] == pytest.approx(0.7)
    assert first["longest_diameter_mm"] == 10.0
    assert link_slice_detections(dets, "axial", (64, 64, 16), (1.0, 1.0, 2.0), max_gap=2)[0]["num_slices"] == 3


def test_a_large_box_does_not_merge_two_tumors() -> None:
    a, b, big = [10, 10, 16, 16], [30, 10, 36, 16], [8, 8, 38, 18]
    dets = [_det(0, a, 0.9), _det(0, b, 0.8), _det(1, a, 0.9), _det(1, b, 0.8), _det(1, big, 0.1),
            _det(2, a, 0.9), _det(2, b, 0.8)]
    lesions = link_slice_detections(dets, "axial", (64, 64, 8), (1.0, 1.0, 1.0))
    spans = sorted((l["box"][0][0], l["num_slices"]) for l in lesions)
    assert spans == [(8, 1), (10, 3), (30, 3)]


def test_no_detections_no_lesions() -> None:
    assert link_slice_detections([], "axial", (8, 8, 8), (1, 1, 1)) == []
