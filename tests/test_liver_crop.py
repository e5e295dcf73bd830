"""Two-stage geometry: crops to the liver region and boxes mapped back exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode

from liver_d2.config import load_config
from liver_d2.data.liver_crop import crop_to_slice, liver_crop_transforms
from liver_d2.data.mapper import LiverDatasetMapper
from liver_d2.data.slicing import slice_boxes

from test_inference import DEMO


@pytest.mark.parametrize("net_size", [(200, 240), (100, 120)])
def test_known_crop_box_lands_on_the_known_slice_box(net_size) -> None:
    """A box on the resized crop maps to the slice box it came from, also when the network
    grid is a spacing-resized copy of the stored slice (here 200 x 240 -> 100 x 120)."""
    slice_size = (200, 240)
    liver = [40.0, 30.0, 150.0, 110.0]
    sh, sw = net_size[0] / slice_size[0], net_size[1] / slice_size[1]
    tfms, crop = liver_crop_transforms([v * s for v, s in zip(liver, (sw, sh, sw, sh))], *net_size, size=256, margin=8)
    slice_box = np.array([[60.0, 50.0, 70.5, 58.0]])
    on_crop = tfms.apply_box(slice_box * [sw, sh, sw, sh])
    assert crop[4] == 256 or crop[5] == 256  # longer side resized to SIZE
    back = crop_to_slice(torch.as_tensor(on_crop), crop, net_size, slice_size).numpy()
    assert np.allclose(back, slice_box, atol=1e-4)


def test_crop_is_clipped_to_the_slice() -> None:
    _, crop = liver_crop_transforms([2, 3, 90, 60], 64, 96, size=128, margin=8)
    x0, y0, cw, ch, ow, oh = crop
    assert (x0, y0) == (0, 0) and x0 + cw <= 96 and y0 + ch <= 64 and max(ow, oh) == 128


def test_slice_boxes_per_slice() -> None:
    stack = np.zeros((3, 10, 12), bool)
    stack[0, 2:5, 3:9] = True
    stack[2, 0, 0] = True
    assert slice_boxes(stack) == [[3, 2, 9, 5], None, [0, 0, 1, 1]]


def test_mapper_crops_to_the_liver_and_boxes_follow(tmp_path) -> None:
    from liver_d2.data.slice_io import write_hu_slice

    hu = np.full((96, 128), -1000, np.int16)
    hu[20:80, 30:110] = 60  # liver
    hu[40:46, 50:58] = 20  # tumor
    path = str(tmp_path / "s.png")
    write_hu_slice(path, hu)
    mask = np.zeros((96, 128), np.uint8, order="F")
    mask[40:46, 50:58] = 1
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(mask)
    record = {"file_name": path, "height": 96, "width": 128, "image_id": 1, "context_files": [path],
              "liver_box": [30, 20, 110, 80],
              "annotations": [{"bbox": [50, 40, 8, 6], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                               "segmentation": rle, "iscrowd": 0}]}
    cfg = load_config(DEMO, ["INPUT.LIVER_CROP.ENABLED", "True", "INPUT.LIVER_CROP.SIZE", "160",
                             "INPUT.LIVER_CROP.MARGIN", "4", "INPUT.HU.NUM_SLICES", "1",
                             "MODEL.PIXEL_MEAN", "[0.5]", "MODEL.PIXEL_STD", "[0.25]"])
    out = LiverDatasetMapper(cfg, is_train=False)(record)
    x0, y0, cw, ch, ow, oh = out["liver_crop"]
    assert (x0, y0, cw, ch) == (26, 16, 88, 68) and out["image"].shape[1:] == (oh, ow) and ow == 160
    assert (out["height"], out["width"]) == (oh, ow) and (out["slice_height"], out["slice_width"]) == (96, 128)
    box = out["instances"].gt_boxes.tensor
    back = crop_to_slice(box, out["liver_crop"], out["net_size"], (96, 128))
    assert np.allclose(back.numpy(), [[50, 40, 58, 46]], atol=1.0)  # one crop pixel of resize rounding
