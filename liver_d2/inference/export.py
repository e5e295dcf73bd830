"""TorchScript export of a trained liver_d2 detector (detectron2's tracing adapter).

The traced module takes one CHW float tensor: the network input the liver mapper builds
(HU windowing / z-score / 2.5D channels), *not* raw HU, and returns
``(pred_boxes [N, 4] XYXY, pred_classes [N], scores [N], image_size [2])`` in the input's
pixel coordinates. ``export_info.json`` written next to it records the channel recipe so a
deployment can build the same input. Tracing (not scripting) because detectron2 supports
tracing for every meta-architecture, RetinaNet included, with no model changes.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.export import TracingAdapter

from liver_d2.data.channels import stack_from_volume
from liver_d2.data.slicing import slice_geometry, slice_stack
from liver_d2.data.volumes import read_image
from liver_d2.inference.predictor import VolumePredictor

OUTPUT_NAMES = ["pred_boxes", "pred_classes", "scores", "image_size"]


def sample_input(predictor: VolumePredictor, scan: Optional[str] = None, slice_index: Optional[int] = None) -> torch.Tensor:
    """A real network input to trace with: a scan's slice through the mapper, or (no scan)
    a blank slice of the config's minimum test size."""
    if scan is None:
        size = int(predictor.cfg.INPUT.MIN_SIZE_TEST)
        hu = np.full((size, size, predictor.num_slices), -1000.0, dtype=np.float32)
        described = {"height": size, "width": size}
    else:
        volume = read_image(scan)
        stack = slice_stack(volume.hu, predictor.axis)
        k = stack.shape[0] // 2 if slice_index is None else int(slice_index)
        hu = stack_from_volume(stack, k, predictor.num_slices)
        (row_mm, col_mm), _ = slice_geometry(volume.spacing, predictor.axis)
        described = {"height": stack.shape[1], "width": stack.shape[2], "pixel_spacing": [row_mm, col_mm]}
    return predictor.mapper.map_stack(hu, described)["image"]


def trace_model(predictor: VolumePredictor, image: torch.Tensor) -> tuple[torch.jit.ScriptModule, TracingAdapter]:
    """Trace the predictor's model on one input; the adapter turns outputs back into Instances."""
    adapter = TracingAdapter(predictor.model, [{"image": image}])
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    return traced, adapter


def export_torchscript(cfg_or_path: Union[CfgNode, str], out_dir: str, weights: Optional[str] = None,
                       scan: Optional[str] = None) -> str:
    """Write ``model.ts`` and ``export_info.json`` to ``out_dir``; returns the model path."""
    predictor = VolumePredictor(cfg_or_path, weights)
    traced, _ = trace_model(predictor, sample_input(predictor, scan))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.ts")
    traced.save(path)
    cfg = predictor.cfg
    info = {"input": "one float32 tensor [C, H, W] built as liver_d2.data.channels.build_channels does",
            "channels": int(len(cfg.MODEL.PIXEL_MEAN)), "outputs": OUTPUT_NAMES, **predictor.model_info}
    with open(os.path.join(out_dir, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return path
