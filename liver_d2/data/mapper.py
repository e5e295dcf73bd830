"""detectron2 DatasetMapper for stored HU slices.

Per dataset dict: read the K needed 16-bit HU slices as float32 (never through 8-bit
images), optionally resample to INPUT.HU.TARGET_SPACING, when training apply geometric
then HU-intensity augmentations, build channels with the shared
:func:`liver_d2.data.channels.build_channels`, and transform the annotations with the
same transforms. Each box is recomputed tightly from its transformed tumor mask, since
a box rotated by its corners grows and would teach loose boxes for tiny tumors.
Negative (tumor-free) slices give an empty ``Instances``; they are never dropped here.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, Instances
from fvcore.transforms.transform import TransformList

from liver_d2.config import validate_liver_config
from liver_d2.data.augment import (
    apply_image_transforms,
    build_geometric_augmentations,
    build_intensity_augmentations,
    spacing_transform,
)
from liver_d2.data.channels import ChannelSpec, build_channels, read_dataset_stack
from liver_d2.data.liver_crop import liver_crop_transforms
from liver_d2.errors import LiverD2Error

__all__ = ["LiverDatasetMapper", "mask_box", "polygon_box", "transform_annotations"]


def mask_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight XYXY_ABS box of a binary mask (pixel edges), or None if the mask is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def polygon_box(polygons: list, image_size: tuple[int, int]) -> Optional[np.ndarray]:
    """Box of transformed polygons clipped to the image, or None if nothing is left."""
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons])
    h, w = image_size
    x0, y0 = np.clip(pts.min(axis=0), 0, [w, h])
    x1, y1 = np.clip(pts.max(axis=0), 0, [w, h])
    if x1 <= x0 or y1 <= y0:
        return None
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def transform_annotations(
    annotations: list[dict], tfms: TransformList, image_size: tuple[int, int], keep_masks: bool
) -> list[dict]:
    """Transform instance annotations; boxes tight from masks, vanished instances dropped."""
    out = []
    for anno in annotations:
        if anno.get("iscrowd", 0):
            continue
        anno = utils.transform_instance_annotations(anno, tfms, image_size)
        segm = anno.get("segmentation")
        if isinstance(segm, np.ndarray):  # RLE, decoded and transformed by detectron2
            box = mask_box(segm)
        elif isinstance(segm, list) and segm:  # polygons: vertices moved exactly
            box = polygon_box(segm, image_size)
        else:  # no mask: the box moved by its corners is all there is
            box = np.asarray(anno["bbox"], dtype=np.float32)
        if box is None:  # tumor moved or rotated out of the image
            continue
        anno["bbox"] = box
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            continue
        if not keep_masks:
            anno.pop("segmentation", None)
        out.append(anno)
    return out


class LiverDatasetMapper:
    """Dataset dict -> {"image": CHW float32 tensor, "instances": Instances, ...}.

    Keeps ``height``/``width`` of the original slice so detectron2 rescales predictions
    back when TARGET_SPACING resized the input. In test mode nothing is augmented and the
    original ``annotations`` stay in the dict for evaluation.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        channel_spec: ChannelSpec,
        geometric_augmentations: list[T.Augmentation],
        intensity_augmentations: list[T.Augmentation],
        target_spacing: float = 0.0,
        pad_hu: float = -1024.0,
        mask_on: bool = False,
        liver_crop: Optional[tuple[int, int]] = None,
    ):
        self.is_train = is_train
        self.channel_spec = channel_spec
        self.geometric = T.AugmentationList(list(geometric_augmentations) if is_train else [])
        self.intensity = T.AugmentationList(list(intensity_augmentations) if is_train else [])
        self.target_spacing = float(target_spacing)
        self.pad_hu = float(pad_hu)
        self.mask_on = mask_on
        self.liver_crop = liver_crop  # (size, margin) for two-stage stage two, else None

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool = True) -> dict:
        validate_liver_config(cfg)
        return {
            "is_train": is_train,
            "channel_spec": ChannelSpec.from_cfg(cfg),
            "geometric_augmentations": build_geometric_augmentations(cfg) if is_train else [],
            "intensity_augmentations": build_intensity_augmentations(cfg) if is_train else [],
            "target_spacing": float(cfg.INPUT.HU.TARGET_SPACING),
            "pad_hu": float(cfg.INPUT.HU.PAD_VALUE),
            "mask_on": bool(cfg.MODEL.MASK_ON),
            "liver_crop": (int(cfg.INPUT.LIVER_CROP.SIZE), int(cfg.INPUT.LIVER_CROP.MARGIN))
            if cfg.INPUT.LIVER_CROP.ENABLED else None,
        }

    def _read(self, dataset_dict: dict) -> np.ndarray:
        """The (H, W, K) HU stack, checked against the dict's height/width."""
        hu = read_dataset_stack(dataset_dict, self.channel_spec.num_slices)
        expected = (dataset_dict.get("height", hu.shape[0]), dataset_dict.get("width", hu.shape[1]))
        if hu.shape[:2] != tuple(expected):
            raise LiverD2Error(
                f"{dataset_dict['file_name']}: slice is {hu.shape[:2]} but the dataset says "
                f"{tuple(expected)}; re-prepare the dataset"
            )
        return hu

    def augment(self, hu: np.ndarray, dataset_dict: dict) -> tuple[np.ndarray, TransformList]:
        """Spacing resize + (training) geometric then HU-intensity augmentation.

        Returns the augmented HU stack and the geometric transforms (for annotations).
        The augmentations decide on the centre slice; the warps then run on all K
        slices in cv2-safe channel chunks (see ``apply_image_transforms``).
        """
        h, w = hu.shape[:2]
        tfms = TransformList([spacing_transform(h, w, dataset_dict.get("pixel_spacing"), self.target_spacing)])
        hu = apply_image_transforms(tfms, hu, self.pad_hu)
        if self.liver_crop is not None and dataset_dict.get("liver_box"):
            net_h, net_w = hu.shape[:2]
            box = tfms.apply_box(np.array([dataset_dict["liver_box"]], dtype=np.float32))[0]
            crop_tfms, crop = liver_crop_transforms(box, net_h, net_w, *self.liver_crop)
            hu = apply_image_transforms(crop_tfms, hu, self.pad_hu)
            tfms = tfms + crop_tfms
            # predictions stay on the crop (height/width = crop size); liver_crop.py maps them back
            dataset_dict.update(liver_crop=crop, net_size=[net_h, net_w], slice_height=h, slice_width=w,
                                height=crop[5], width=crop[4])
        if self.is_train and self.geometric.augs:
            centre = hu[:, :, hu.shape[2] // 2] - np.float32(self.pad_hu)
            geometric = self.geometric(T.AugInput(np.ascontiguousarray(centre), boxes=_boxes(dataset_dict, tfms)))
            hu = apply_image_transforms(geometric, hu, self.pad_hu)
            tfms = tfms + geometric
        if self.is_train and self.intensity.augs:
            aug_input = T.AugInput(hu)
            self.intensity(aug_input)  # transforms HU values in place of aug_input.image
            hu = aug_input.image.astype(np.float32)
        return hu, tfms

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        return self.map_stack(self._read(dataset_dict), dataset_dict)

    def map_stack(self, hu: np.ndarray, dataset_dict: dict) -> dict:
        """Network input (and instances) for an (H, W, K) HU stack described by
        ``dataset_dict`` (height, width, pixel_spacing, annotations). The volume predictor
        calls this with slices cut from a scan, so inference can't prepare them differently."""
        hu, tfms = self.augment(hu, dataset_dict)
        image_size = hu.shape[:2]
        channels = build_channels(hu, self.channel_spec)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(channels.transpose(2, 0, 1)))

        annotations = dataset_dict.get("annotations") or []
        annos = transform_annotations(copy.deepcopy(annotations), tfms, image_size, self.mask_on)
        instances = utils.annotations_to_instances(annos, image_size, mask_format="bitmask")
        dataset_dict["instances"] = instances if len(annos) else _empty_instances(image_size, self.mask_on)
        if self.is_train:
            dataset_dict.pop("annotations", None)
        return dataset_dict


def _boxes(dataset_dict: dict, tfms: TransformList) -> np.ndarray:
    """The dict's tumor boxes (XYXY, after ``tfms``), for augmentations that look at them."""
    annotations = [a for a in dataset_dict.get("annotations") or [] if not a.get("iscrowd", 0)]
    if not annotations:
        return np.zeros((0, 4), dtype=np.float32)
    boxes = np.array([BoxMode.convert(a["bbox"], a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
                      for a in annotations], dtype=np.float32)
    return tfms.apply_box(boxes)


def _empty_instances(image_size: tuple[int, int], mask_on: bool) -> Instances:
    """A negative slice: zero boxes (and zero masks), still trained on as background."""
    inst = utils.annotations_to_instances([], image_size)
    if mask_on:
        inst.gt_masks = BitMasks(torch.zeros((0, *image_size), dtype=torch.bool))
    return inst

