"""VolumePredictor: a CT scan (NIfTI file or DICOM folder) to 3D tumor findings.

The scan goes through the same reader (canonical LPS orientation, HU), the same slicing
and the same mapper (spacing resize, channels) as the training data, with the settings
taken from the config saved next to the model, so a scan cannot be fed differently from
the way the model was trained. Slice detections are linked into 3D lesions by
:func:`liver_d2.lesions.link_slice_detections`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import numpy as np
import torch
from detectron2.config import CfgNode

from liver_d2.config import load_config, use_cpu_without_gpu, validate_liver_config
from liver_d2.data.channels import stack_from_volume
from liver_d2.data.mapper import LiverDatasetMapper
from liver_d2.data.liver_crop import outputs_to_slice
from liver_d2.data.slicing import slice_boxes, slice_geometry, slice_stack
from liver_d2.data.volumes import Volume, read_image, read_label
from liver_d2.errors import LiverD2Error
from liver_d2.lesions import link_slice_detections

CONFIG_NAME = "config.yaml"  # what detectron2's default_setup saves next to checkpoints
WEIGHT_NAMES = ("model_final.pth", "model_best.pth")


def resolve_model(cfg_or_path: Union[CfgNode, str], weights: Optional[str] = None) -> tuple[CfgNode, str]:
    """(config, weights file) from a config, a config file, or a training output folder
    (its ``config.yaml`` and ``model_final.pth``, else ``model_best.pth``)."""
    if isinstance(cfg_or_path, CfgNode):
        cfg = cfg_or_path.clone()
        cfg.defrost()
        use_cpu_without_gpu(cfg)
        validate_liver_config(cfg)
    elif os.path.isdir(cfg_or_path):
        config_file = os.path.join(cfg_or_path, CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise LiverD2Error(f"{cfg_or_path}: no {CONFIG_NAME}; give the output folder of a training run or a config file")
        cfg = load_config(config_file)
        if weights is None:
            found = [os.path.join(cfg_or_path, n) for n in WEIGHT_NAMES if os.path.isfile(os.path.join(cfg_or_path, n))]
            if not found:
                raise LiverD2Error(f"{cfg_or_path}: no {' or '.join(WEIGHT_NAMES)}; train first or pass the weights file")
            weights = found[0]
    else:
        cfg = load_config(cfg_or_path)
    weights = weights if weights is not None else cfg.MODEL.WEIGHTS
    if not weights:
        raise LiverD2Error("no model weights: pass a trained checkpoint (.pth) or a training output folder")
    if not os.path.isfile(weights):
        raise LiverD2Error(f"{weights}: weights file not found")
    cfg.MODEL.WEIGHTS = weights
    return cfg, weights


@dataclass
class VolumePrediction:
    """Findings for one scan, in the canonical (LPS) voxel grid of ``volume``."""

    volume: Volume
    axis: str
    detections: list[dict]  # {"slice_index", "box" XYXY pixels of the displayed slice, "score"}
    lesions: list[dict]  # see liver_d2.lesions.link_slice_detections
    slices_run: int
    seconds: float
    model: dict = field(default_factory=dict)  # weights file and config keys that shaped the input

    def to_record(self, include_patient_fields: bool = False) -> dict:
        """JSON-ready findings. No identifying DICOM fields unless asked for: the reader
        keeps only technical header fields, and identifying ones are read here on request."""
        v = self.volume
        record = {
            "volume_id": v.volume_id,
            "source": os.path.basename(os.path.normpath(v.source)),
            "shape": list(v.shape),
            "spacing": list(v.spacing),
            "affine": np.asarray(v.affine).tolist(),
            "orientation": "LPS voxel index order (liver_d2 canonical); boxes are voxel-edge coordinates",
            "axis": self.axis,
            "slices_run": self.slices_run,
            "seconds": round(self.seconds, 3),
            "model": self.model,
            "dicom": dict(v.meta),
            "lesions": self.lesions,
        }
        if include_patient_fields and os.path.isdir(v.source):
            from liver_d2.data.dicom import patient_fields

            record["patient"] = patient_fields(v.source)
        return record


def load_scan(scan: Union[str, Volume], liver_mask: Union[str, np.ndarray, None] = None
              ) -> tuple[Volume, Optional[np.ndarray]]:
    """A scan (path or Volume) and its optional liver label (path or LPS array) on its grid."""
    volume = read_image(scan) if isinstance(scan, str) else scan
    if isinstance(liver_mask, str):
        liver_mask = read_label(liver_mask, like=volume)
    return volume, liver_mask


class VolumePredictor:
    """Runs a trained liver_d2 detector over whole scans.

    ``VolumePredictor("output/demo")`` loads the run's saved config and final weights;
    ``predictor("scan.nii.gz")`` returns a :class:`VolumePrediction`.
    """

    def __init__(self, cfg_or_path: Union[CfgNode, str], weights: Optional[str] = None, *, batch_size: int = 8,
                 score_thresh: Optional[float] = None):
        from liver_d2.engine.checkpoint import LiverCheckpointer
        from liver_d2.engine.trainer import Trainer

        cfg, weights = resolve_model(cfg_or_path, weights)
        if score_thresh is not None:
            cfg.MODEL.RETINANET.SCORE_THRESH_TEST = float(score_thresh)
            cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_thresh)
        cfg.freeze()
        self.cfg = cfg
        self.batch_size = max(int(batch_size), 1)
        self.axis = cfg.INPUT.SLICE_AXIS
        self.model = Trainer.build_model(cfg)
        LiverCheckpointer(self.model).load(weights)
        self.model.eval()
        self.mapper = LiverDatasetMapper(cfg, is_train=False)
        self.num_slices = self.mapper.channel_spec.num_slices
        self.liver_crop = bool(cfg.INPUT.LIVER_CROP.ENABLED)
        self.stage1: Optional[VolumePredictor] = None
        if self.liver_crop and cfg.INPUT.LIVER_CROP.STAGE1:
            self.stage1 = VolumePredictor(cfg.INPUT.LIVER_CROP.STAGE1, batch_size=batch_size)
        self.model_info = {"weights": os.path.basename(weights), "hu_mode": cfg.INPUT.HU.MODE,
                           "windows": [list(w) for w in cfg.INPUT.HU.WINDOWS], "num_slices": cfg.INPUT.HU.NUM_SLICES,
                           "target_spacing": cfg.INPUT.HU.TARGET_SPACING, "axis": self.axis}

    # ------------------------------------------------------------------ slices
    def slice_indices(self, volume: Volume, liver_mask: Optional[np.ndarray] = None) -> np.ndarray:
        """Every slice, or only those where the (LPS) liver mask has a voxel."""
        depth = slice_stack(volume.hu, self.axis).shape[0]
        if liver_mask is None:
            return np.arange(depth)
        return np.flatnonzero(slice_stack(np.asarray(liver_mask) > 0, self.axis).any(axis=(1, 2)))

    def liver_boxes(self, volume: Volume, liver_mask: Optional[np.ndarray]) -> dict[int, list[float]]:
        """Two-stage: the liver box of each slice, from the user's label map or else from
        the stage-one liver detector (its best box per slice)."""
        if liver_mask is not None:
            boxes = slice_boxes(slice_stack(np.asarray(liver_mask) > 0, self.axis))
            return {k: b for k, b in enumerate(boxes) if b is not None}
        if self.stage1 is None:
            raise LiverD2Error(f"{volume.source}: this model detects tumors inside the liver (INPUT.LIVER_CROP); "
                               "give a liver label map (--liver-masks) or set INPUT.LIVER_CROP.STAGE1 to a "
                               "liver detector's output folder")
        found: dict[int, tuple[float, list[float]]] = {}
        min_score = float(self.cfg.INPUT.LIVER_CROP.STAGE1_SCORE)
        for det in self.stage1.predict(volume).detections:
            k = det["slice_index"]
            if det["score"] >= min_score and det["score"] > found.get(k, (-1.0, []))[0]:
                found[k] = (det["score"], det["box"])
        return {k: box for k, (_, box) in found.items()}

    def batches(self, volume: Volume, indices: np.ndarray, liver_boxes: Optional[dict] = None
                ) -> Iterator[tuple[list[int], list[dict]]]:
        """Mapped model inputs, ``batch_size`` slices at a time, built by the training mapper."""
        stack = slice_stack(volume.hu, self.axis)
        pixel_spacing, thickness = slice_geometry(volume.spacing, self.axis)
        height, width = stack.shape[1:]
        for start in range(0, len(indices), self.batch_size):
            chunk = [int(k) for k in indices[start : start + self.batch_size]]
            inputs = []
            for k in chunk:
                described = {"height": height, "width": width, "pixel_spacing": list(pixel_spacing),
                             "slice_thickness": thickness, "slice_index": k}
                if liver_boxes is not None:
                    described["liver_box"] = liver_boxes[k]
                mapped = self.mapper.map_stack(stack_from_volume(stack, k, self.num_slices), described)
                inputs.append({key: mapped[key] for key in ("image", "height", "width", "liver_crop", "net_size",
                                                             "slice_height", "slice_width") if key in mapped})
            yield chunk, inputs

    # --------------------------------------------------------------- predicting
    def predict(self, scan: Union[str, Volume], liver_mask: Union[str, np.ndarray, None] = None) -> VolumePrediction:
        """Findings for one scan (path or Volume); ``liver_mask`` (a label map path or an
        LPS array on the scan's grid) restricts inference to slices holding liver."""
        t0 = time.perf_counter()
        volume, liver_mask = load_scan(scan, liver_mask)
        indices = self.slice_indices(volume, liver_mask)
        liver_boxes = None
        if self.liver_crop:  # stage two runs only where stage one (or the label) found liver
            liver_boxes = self.liver_boxes(volume, liver_mask)
            indices = np.array([k for k in indices if k in liver_boxes], dtype=int)
        detections: list[dict] = []
        with torch.inference_mode():  # no autograd bookkeeping at all (cheaper than no_grad)
            for chunk, inputs in self.batches(volume, indices, liver_boxes):
                for k, output in zip(chunk, outputs_to_slice(inputs, self.model(inputs))):
                    inst = output["instances"].to("cpu")
                    for box, score in zip(inst.pred_boxes.tensor.numpy(), inst.scores.numpy()):
                        detections.append({"slice_index": k, "box": [float(v) for v in box], "score": float(score)})
        lesions_cfg = self.cfg.TEST.LESIONS
        lesions = link_slice_detections(detections, self.axis, volume.shape, volume.spacing, volume.affine,
                                        link_iou=float(lesions_cfg.LINK_IOU), max_gap=int(lesions_cfg.MAX_GAP))
        return VolumePrediction(volume=volume, axis=self.axis, detections=detections, lesions=lesions,
                                slices_run=int(len(indices)), seconds=time.perf_counter() - t0,
                                model=dict(self.model_info))

    __call__ = predict
