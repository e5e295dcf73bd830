"""Augmentations as detectron2 ``Augmentation`` / ``Transform`` classes.

Geometric augmentations are detectron2/fvcore transforms (flip, rotation, resize, crop,
pad), so boxes and masks move with the image through ``apply_box`` /
``apply_segmentation``. Intensity augmentations act on HU (before channels are built),
so "+20 HU brightness" means the same thing for every channel mode; their coordinates
are unchanged.

Images handed to the geometric transforms are ``hu - pad_hu`` (see
:func:`apply_image_transforms`): every transform here fills uncovered pixels with 0,
so after adding ``pad_hu`` back they hold ``pad_hu`` (air by default), not water.
Bilinear warps and resizes are linear, so the shift changes nothing else.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import CropTransform, NoOpTransform, PadTransform, Transform, TransformList

from liver_d2.errors import LiverD2Error

# cv2.warpAffine handles at most 4 channels in some OpenCV builds and drops a
# trailing channel axis of size 1; geometric transforms get chunks of this many channels.
_MAX_CV2_CHANNELS = 4


def apply_image_transforms(tfms: TransformList, image: np.ndarray, pad_hu: float) -> np.ndarray:
    """Apply geometric transforms to an (H, W, C) float HU image, filling with ``pad_hu``."""
    if all(isinstance(t, NoOpTransform) for t in tfms.transforms):
        return image
    shifted = image.astype(np.float32) - np.float32(pad_hu)
    chunks = []
    for start in range(0, shifted.shape[2], _MAX_CV2_CHANNELS):
        chunk = np.ascontiguousarray(shifted[:, :, start : start + _MAX_CV2_CHANNELS])
        out = tfms.apply_image(chunk)
        if out.ndim == 2:  # cv2 drops a single channel axis
            out = out[:, :, None]
        chunks.append(out)
    return (np.concatenate(chunks, axis=2) + np.float32(pad_hu)).astype(np.float32)


# --------------------------------------------------------------------- geometry


def shift_transforms(h: int, w: int, dx: int, dy: int) -> list[Transform]:
    """Move content by (dx, dy) pixels keeping size (h, w): crop one side, pad the other."""
    dx = int(np.clip(dx, -(w - 1), w - 1))
    dy = int(np.clip(dy, -(h - 1), h - 1))
    if dx == 0 and dy == 0:
        return []
    crop = CropTransform(max(0, -dx), max(0, -dy), w - abs(dx), h - abs(dy), orig_w=w, orig_h=h)
    pad = PadTransform(max(0, dx), max(0, dy), max(0, -dx), max(0, -dy),
                       orig_w=w - abs(dx), orig_h=h - abs(dy), pad_value=0, seg_pad_value=0)
    return [crop, pad]


def fit_transforms(h: int, w: int, new_h: int, new_w: int) -> list[Transform]:
    """Centre-crop / centre-pad an (h, w) image to (new_h, new_w), per axis."""
    tfms: list[Transform] = []
    ch, cw = min(h, new_h), min(w, new_w)
    if (ch, cw) != (h, w):
        tfms.append(CropTransform((w - cw) // 2, (h - ch) // 2, cw, ch, orig_w=w, orig_h=h))
    if (ch, cw) != (new_h, new_w):
        x0, y0 = (new_w - cw) // 2, (new_h - ch) // 2
        tfms.append(PadTransform(x0, y0, new_w - cw - x0, new_h - ch - y0,
                                 orig_w=cw, orig_h=ch, pad_value=0, seg_pad_value=0))
    return tfms


class RandomScaleJitter(T.Augmentation):
    """Zoom by s ~ U(lo, hi) about the centre, keeping the image size (crop or pad back)."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        s = self._rand_range(self.lo, self.hi) if self.hi > self.lo else self.lo
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        if (nh, nw) == (h, w):
            return NoOpTransform()
        return TransformList([T.ResizeTransform(h, w, nh, nw)] + fit_transforms(nh, nw, h, w))


class RandomTranslate(T.Augmentation):
    """Shift by up to ``max_frac`` of the width/height in each direction (crop + pad)."""

    def __init__(self, max_frac: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        dx = int(round(self._rand_range(-self.max_frac, self.max_frac) * w))
        dy = int(round(self._rand_range(-self.max_frac, self.max_frac) * h))
        tfms = shift_transforms(h, w, dx, dy)
        return TransformList(tfms) if tfms else NoOpTransform()


class TumorCentredCrop(T.Augmentation):
    """A ``size`` x ``size`` training crop that holds a tumor with probability ``tumor_prob``
    (the crop is placed so a randomly chosen box centre lies inside it), else anywhere.

    Why: a from-scratch detector on a CPU sees few tumor pixels per second on whole
    slices; crops cost a fraction of a slice and keep almost every tumor, so the same
    minutes give several times more tumor examples. The network is fully convolutional,
    so it is still tested on whole slices.
    """

    def __init__(self, size: int, tumor_prob: float = 0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray, boxes: Any = None) -> Transform:
        h, w = image.shape[:2]
        ch, cw = min(self.size, h), min(self.size, w)
        if (ch, cw) == (h, w):
            return NoOpTransform()
        if boxes is not None and len(boxes) and self._rand_range() < self.tumor_prob:
            x0, y0, x1, y1 = np.asarray(boxes, dtype=np.float64)[np.random.randint(len(boxes))]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            left = np.random.uniform(max(0.0, cx - cw + 1), min(float(w - cw), cx))
            top = np.random.uniform(max(0.0, cy - ch + 1), min(float(h - ch), cy))
        else:
            left, top = np.random.uniform(0, w - cw), np.random.uniform(0, h - ch)
        return CropTransform(int(left), int(top), cw, ch, orig_w=w, orig_h=h)


def spacing_transform(h: int, w: int, pixel_spacing: Any, target_mm: float) -> Transform:
    """Resize to ``target_mm`` per pixel from ``pixel_spacing`` [row_mm, col_mm]; 0 = keep."""
    if target_mm <= 0:
        return NoOpTransform()
    if pixel_spacing is None or len(pixel_spacing) != 2 or min(pixel_spacing) <= 0:
        raise LiverD2Error(
            f"INPUT.HU.TARGET_SPACING={target_mm} needs a dataset 'pixel_spacing' [row_mm, col_mm], "
            f"got {pixel_spacing!r}; set INPUT.HU.TARGET_SPACING 0 or fix the dataset"
        )
    nh = max(1, int(round(h * float(pixel_spacing[0]) / target_mm)))
    nw = max(1, int(round(w * float(pixel_spacing[1]) / target_mm)))
    if (nh, nw) == (h, w):
        return NoOpTransform()
    return T.ResizeTransform(h, w, nh, nw)


def build_geometric_augmentations(cfg: Any) -> list[T.Augmentation]:
    """Training crop (always), then flip, rotation (expand=False), scale jitter and
    translation when ``cfg.INPUT.AUG.ENABLED``."""
    aug = cfg.INPUT.AUG
    augs: list[T.Augmentation] = []
    if aug.CROP_SIZE > 0:  # first, so the warps below run on the small crop
        augs.append(TumorCentredCrop(int(aug.CROP_SIZE), float(aug.CROP_TUMOR_PROB)))
    if not aug.ENABLED:
        return augs
    if aug.FLIP_H_PROB > 0:
        augs.append(T.RandomFlip(prob=float(aug.FLIP_H_PROB), horizontal=True, vertical=False))
    if aug.FLIP_V_PROB > 0:
        augs.append(T.RandomFlip(prob=float(aug.FLIP_V_PROB), horizontal=False, vertical=True))
    if aug.ROTATION_DEG > 0:
        deg = float(aug.ROTATION_DEG)
        augs.append(T.RandomRotation([-deg, deg], expand=False, sample_style="range"))
    lo, hi = (float(v) for v in aug.SCALE_RANGE)
    if (lo, hi) != (1.0, 1.0):
        augs.append(RandomScaleJitter((lo, hi)))
    if aug.TRANSLATE_FRAC > 0:
        augs.append(RandomTranslate(float(aug.TRANSLATE_FRAC)))
    return augs


# -------------------------------------------------------------------- intensity


class _IntensityTransform(Transform):
    """Base for HU-value transforms: pixels change, geometry does not."""

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class HUBrightnessTransform(_IntensityTransform):
    """Add ``offset_hu`` to every pixel (scanner calibration drift)."""

    def __init__(self, offset_hu: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return (img + np.float32(self.offset_hu)).astype(np.float32)


class HUContrastTransform(_IntensityTransform):
    """Scale HU by ``factor`` around ``center_hu`` (the slice mean), keeping the mean."""

    def __init__(self, factor: float, center_hu: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        c = np.float32(self.center_hu)
        return ((img - c) * np.float32(self.factor) + c).astype(np.float32)


class HUNoiseTransform(_IntensityTransform):
    """Add Gaussian noise of ``std_hu``; the seed makes it repeatable."""

    def __init__(self, std_hu: float, seed: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        noise = np.random.default_rng(self.seed).normal(0.0, self.std_hu, size=img.shape)
        return (img + noise.astype(np.float32)).astype(np.float32)


class RandomHUBrightness(T.Augmentation):
    """Offset ~ U(-max_hu, max_hu)."""

    def __init__(self, max_hu: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        return HUBrightnessTransform(float(self._rand_range(-self.max_hu, self.max_hu)))


class RandomHUContrast(T.Augmentation):
    """Factor ~ U(lo, hi) around the mean of the whole stack (all K slices alike)."""

    def __init__(self, factor_range: tuple[float, float]):
        super().__init__()
        lo, hi = float(factor_range[0]), float(factor_range[1])
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        factor = self._rand_range(self.lo, self.hi) if self.hi > self.lo else self.lo
        return HUContrastTransform(float(factor), float(np.mean(image, dtype=np.float64)))


class RandomHUNoise(T.Augmentation):
    """Gaussian noise with std ~ U(0, max_std_hu)."""

    def __init__(self, max_std_hu: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        std = float(self._rand_range(0.0, self.max_std_hu))
        return HUNoiseTransform(std, int(np.random.randint(0, 2**31 - 1)))


def build_intensity_augmentations(cfg: Any) -> list[T.Augmentation]:
    """HU brightness, contrast and noise from ``cfg.INPUT.AUG`` (applied after geometry)."""
    aug = cfg.INPUT.AUG
    if not aug.ENABLED:
        return []
    augs: list[T.Augmentation] = []
    if aug.BRIGHTNESS_HU > 0:
        augs.append(RandomHUBrightness(float(aug.BRIGHTNESS_HU)))
    lo, hi = (float(v) for v in aug.CONTRAST_RANGE)
    if (lo, hi) != (1.0, 1.0):
        augs.append(RandomHUContrast((lo, hi)))
    if aug.NOISE_STD_HU > 0:
        augs.append(RandomHUNoise(float(aug.NOISE_STD_HU)))
    return augs
