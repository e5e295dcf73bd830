"""Two-stage detection, stage two's geometry: crop each slice to its liver region, resize
the crop to a fixed size (small tumors get more pixels), and map boxes found on the crop
back to the full slice.

The liver region comes from the liver label when there is one (prepared datasets store a
box per slice; the predictor takes a user's label map) or from stage one, a detector
trained on those liver boxes (``<dataset>_liver_<split>``). The crop is a detectron2
CropTransform + ResizeTransform, so training annotations follow it like any other
transform; ``crop_to_slice`` is its exact inverse for predicted boxes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, Instances
from fvcore.transforms.transform import CropTransform, TransformList


def liver_crop_transforms(liver_box: Sequence[float], height: int, width: int, size: int,
                          margin: int) -> tuple[TransformList, list[int]]:
    """Crop to ``liver_box`` (XYXY) widened by ``margin`` pixels and clipped to the image,
    then resize so the longer side is ``size``. Returns the transforms and the crop
    record [x0, y0, crop_w, crop_h, out_w, out_h] that ``crop_to_slice`` inverts."""
    x0 = int(max(0, np.floor(liver_box[0]) - margin))
    y0 = int(max(0, np.floor(liver_box[1]) - margin))
    x1 = int(min(width, np.ceil(liver_box[2]) + margin))
    y1 = int(min(height, np.ceil(liver_box[3]) + margin))
    cw, ch = max(1, x1 - x0), max(1, y1 - y0)
    scale = size / max(cw, ch)
    ow, oh = max(1, int(round(cw * scale))), max(1, int(round(ch * scale)))
    tfms = TransformList([CropTransform(x0, y0, cw, ch, orig_w=width, orig_h=height), T.ResizeTransform(ch, cw, oh, ow)])
    return tfms, [x0, y0, cw, ch, ow, oh]


def crop_to_slice(boxes: torch.Tensor, crop: Sequence[int], net_size: Sequence[int],
                  slice_size: Sequence[int]) -> torch.Tensor:
    """XYXY boxes on the resized crop -> the original slice: undo the resize and the crop
    (giving the slice as the network saw it, ``net_size`` = (h, w) after any spacing
    resize), then scale to the stored slice ``slice_size`` = (h, w)."""
    x0, y0, cw, ch, ow, oh = crop
    sx = (cw / ow) * (slice_size[1] / net_size[1])
    sy = (ch / oh) * (slice_size[0] / net_size[0])
    ox, oy = x0 * slice_size[1] / net_size[1], y0 * slice_size[0] / net_size[0]
    scale = boxes.new_tensor([sx, sy, sx, sy])
    offset = boxes.new_tensor([ox, oy, ox, oy])
    return boxes * scale + offset


def outputs_to_slice(inputs: list[dict], outputs: list[dict]) -> list[dict]:
    """Model outputs on liver crops as outputs on the full slices (others pass as they are)."""
    mapped = []
    for inp, out in zip(inputs, outputs):
        crop = inp.get("liver_crop")
        if crop is None or "instances" not in out:
            mapped.append(out)
            continue
        inst = out["instances"]
        slice_size = (int(inp["slice_height"]), int(inp["slice_width"]))
        new = Instances(slice_size)
        for name, value in inst.get_fields().items():
            new.set(name, value)
        new.pred_boxes = Boxes(crop_to_slice(inst.pred_boxes.tensor, crop, inp["net_size"], slice_size))
        mapped.append({**out, "instances": new})
    return mapped


class SliceCoordinatesEvaluator(DatasetEvaluator):
    """Hands an evaluator full-slice boxes when the model ran on liver crops."""

    def __init__(self, inner: DatasetEvaluator):
        self.inner = inner

    def reset(self) -> None:
        self.inner.reset()

    def process(self, inputs, outputs) -> None:
        self.inner.process(inputs, outputs_to_slice(inputs, outputs))

    def evaluate(self):
        return self.inner.evaluate()
