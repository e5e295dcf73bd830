"""LiverDatasetMapper with real detectron2 transforms: boxes follow the tumor.

Each test writes a few 16-bit HU slices with a bright disc ("tumor", 300 HU on 40 HU
tissue), runs the mapper, re-finds the disc in the output image by thresholding, and
checks the output box encloses it tightly.
"""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from liver_d2.config import add_liver_config, set_default_pixel_stats
from liver_d2.data.augment import apply_image_transforms, build_geometric_augmentations
from liver_d2.data.channels import ChannelSpec, build_channels
from liver_d2.data.mapper import LiverDatasetMapper
from liver_d2.data.slice_io import write_hu_slice
from liver_d2.errors import LiverD2Error

H = W = 64
BG_HU, TUMOR_HU = 40, 300
THRESH = 0.5 * ((BG_HU + 100) + (TUMOR_HU + 100)) / 500.0  # midway, window [-100, 400]
AUG_OFF = {
    "INPUT.AUG.FLIP_H_PROB": 0.0, "INPUT.AUG.FLIP_V_PROB": 0.0, "INPUT.AUG.ROTATION_DEG": 0.0,
    "INPUT.AUG.TRANSLATE_FRAC": 0.0, "INPUT.AUG.SCALE_RANGE": [1.0, 1.0],
    "INPUT.AUG.BRIGHTNESS_HU": 0.0, "INPUT.AUG.CONTRAST_RANGE": [1.0, 1.0], "INPUT.AUG.NOISE_STD_HU": 0.0,
}


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def make_dict(tmp_path, discs=((20, 42, 6),), n_context: int = 5, name: str = "v") -> dict:
    """A dataset dict like the registered ones: centre slice k with discs, k±j at BG+j HU."""
    files = []
    masks = [disc(*d) for d in discs]
    for j in range(-(n_context // 2), n_context // 2 + 1):
        hu = np.full((H, W), BG_HU + j, np.int16)
        if j == 0:
            for m in masks:
                hu[m] = TUMOR_HU
        path = str(tmp_path / f"{name}_{j + 10}.png")
        write_hu_slice(path, hu)
        files.append(path)
    annos = []
    for m in masks:
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        bbox = [float(v) for v in mask_util.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        annos.append({"bbox": bbox, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                      "segmentation": rle, "iscrowd": 0})
    return {
        "file_name": files[n_context // 2], "height": H, "width": W, "image_id": name,
        "annotations": annos, "volume_id": name, "slice_index": 7, "axis": 2,
        "pixel_spacing": [0.8, 0.8], "has_liver": True, "has_tumor": bool(annos),
        "context_files": files, "hu_offset": 32768,
    }


def make_cfg(opts: dict | None = None, **hu):
    cfg = get_cfg()
    add_liver_config(cfg)
    for key, value in hu.items():
        cfg.INPUT.HU[key] = value
    set_default_pixel_stats(cfg)
    merged = {**AUG_OFF, **(opts or {})}
    cfg.merge_from_list([x for kv in merged.items() for x in kv])
    return cfg


def found_box(image) -> np.ndarray:
    """Box (XYXY, pixel edges) of the bright disc re-found in the centre window channel."""
    img = image.numpy()[image.shape[0] // 2]
    ys, xs = np.nonzero(img > THRESH)
    assert len(xs), "disc not found in output image"
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def assert_box_follows(out: dict, min_iou: float = 0.8, tol: float = 1.0) -> None:
    boxes = out["instances"].gt_boxes.tensor.numpy()
    assert boxes.shape == (1, 4)
    box, seen = boxes[0], found_box(out["image"])
    assert box[0] <= seen[0] + tol and box[1] <= seen[1] + tol, (box, seen)
    assert box[2] >= seen[2] - tol and box[3] >= seen[3] - tol, (box, seen)
    assert iou(box, seen) >= min_iou, (box, seen, iou(box, seen))


@pytest.mark.parametrize(
    "opts",
    [
        {"INPUT.AUG.FLIP_H_PROB": 1.0},
        {"INPUT.AUG.FLIP_V_PROB": 1.0},
        {"INPUT.AUG.ROTATION_DEG": 30.0},
        {"INPUT.AUG.SCALE_RANGE": [1.4, 1.4]},
        {"INPUT.AUG.SCALE_RANGE": [0.6, 0.6]},
        {"INPUT.AUG.TRANSLATE_FRAC": 0.2},
    ],
    ids=["hflip", "vflip", "rot30", "zoom_in", "zoom_out", "translate"],
)
def test_box_follows_tumor_under_each_augmentation(tmp_path, opts: dict) -> None:
    d = make_dict(tmp_path)
    mapper = LiverDatasetMapper(make_cfg(opts), is_train=True)
    original = np.array([36, 14, 49, 27], np.float32)  # disc (20, 42, r=6) by hand
    moved = False
    for seed in range(3):
        np.random.seed(seed)
        out = mapper(d)
        assert out["image"].shape == (1, H, W)
        assert_box_follows(out)
        moved |= not np.allclose(out["instances"].gt_boxes.tensor.numpy()[0], original)
    assert moved, "augmentation never moved the tumor"


def test_rotation_box_is_recomputed_tight_not_from_corners(tmp_path) -> None:
    # A 45-degree turn of the disc's box by its corners would give IoU ~0.5 with the disc.
    for r in (6, 2):  # normal and tiny tumor
        d = make_dict(tmp_path, discs=((22, 40, r),), name=f"r{r}")
        mapper = LiverDatasetMapper(
            make_cfg(), is_train=True,
            geometric_augmentations=[T.RandomRotation([45.0, 45.0], expand=False)],
        )
        out = mapper(d)
        assert_box_follows(out, min_iou=0.85 if r > 2 else 0.6)
        box = out["instances"].gt_boxes.tensor.numpy()[0]
        assert box[2] - box[0] <= 2 * r + 2  # tight, not sqrt(2) wider


def test_all_augmentations_together_in_25d_multiwindow(tmp_path) -> None:
    d = make_dict(tmp_path)
    opts = {"INPUT.AUG.FLIP_H_PROB": 0.5, "INPUT.AUG.FLIP_V_PROB": 0.5, "INPUT.AUG.ROTATION_DEG": 20.0,
            "INPUT.AUG.TRANSLATE_FRAC": 0.1, "INPUT.AUG.SCALE_RANGE": [0.8, 1.2],
            "INPUT.AUG.BRIGHTNESS_HU": 10.0, "INPUT.AUG.CONTRAST_RANGE": [0.9, 1.1],
            "INPUT.AUG.NOISE_STD_HU": 5.0}
    # windows [A, B] x 5 slices = 10 channels (> cv2's 4): channel 2 is A(k), the centre
    cfg = make_cfg(opts, MODE="multiwindow", WINDOWS=[[-100.0, 400.0], [0.0, 100.0]], NUM_SLICES=5)
    mapper = LiverDatasetMapper(cfg, is_train=True)
    for seed in range(4):
        np.random.seed(seed)
        out = mapper(d)
        assert out["image"].shape == (10, H, W) and out["image"].dtype.is_floating_point
        assert_box_follows({"image": out["image"][:5], "instances": out["instances"]}, min_iou=0.75)


def test_same_seed_same_sample(tmp_path) -> None:
    d = make_dict(tmp_path)
    opts = {"INPUT.AUG.ROTATION_DEG": 20.0, "INPUT.AUG.NOISE_STD_HU": 5.0}
    mapper = LiverDatasetMapper(make_cfg(opts), is_train=True)
    np.random.seed(7)
    a = mapper(d)
    np.random.seed(7)
    b = mapper(d)
    assert (a["image"] == b["image"]).all()


def test_negative_slice_gives_empty_instances(tmp_path) -> None:
    d = make_dict(tmp_path, discs=())
    opts = {"INPUT.AUG.ROTATION_DEG": 20.0, "INPUT.AUG.FLIP_H_PROB": 0.5, "INPUT.AUG.NOISE_STD_HU": 5.0}
    for mask_on in (False, True):
        cfg = make_cfg({**opts, "MODEL.MASK_ON": mask_on})
        out = LiverDatasetMapper(cfg, is_train=True)(d)
        assert out["image"].shape == (1, H, W)
        assert len(out["instances"]) == 0 and out["instances"].gt_boxes.tensor.shape == (0, 4)
        assert out["instances"].image_size == (H, W)


def test_test_mode_no_augmentation_keeps_annotations_and_size(tmp_path) -> None:
    d = make_dict(tmp_path)
    opts = {"INPUT.AUG.ROTATION_DEG": 45.0, "INPUT.AUG.NOISE_STD_HU": 50.0}
    out = LiverDatasetMapper(make_cfg(opts, MODE="raw"), is_train=False)(d)
    assert out["annotations"] == d["annotations"] and (out["height"], out["width"]) == (H, W)
    hu = out["image"].numpy()[0]
    assert hu.max() == TUMOR_HU and hu.min() == BG_HU  # HU exact: no 8-bit path, no noise
    np.testing.assert_array_equal(out["instances"].gt_boxes.tensor.numpy()[0], [36, 14, 49, 27])


def test_target_spacing_resizes_image_and_boxes(tmp_path) -> None:
    d = make_dict(tmp_path)  # 0.8 mm pixels -> 1.6 mm halves the size
    out = LiverDatasetMapper(make_cfg(TARGET_SPACING=1.6), is_train=False)(d)
    assert out["image"].shape == (1, H // 2, W // 2) and (out["height"], out["width"]) == (H, W)
    assert_box_follows(out, min_iou=0.6)
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy()[0], [18, 7, 25, 14], atol=1)


def test_25d_channels_are_neighbours_in_order(tmp_path) -> None:
    d = make_dict(tmp_path)
    out = LiverDatasetMapper(make_cfg(MODE="raw", NUM_SLICES=3), is_train=False)(d)
    np.testing.assert_array_equal(out["image"][:, 0, 0].numpy(), [BG_HU - 1, BG_HU, BG_HU + 1])
    with pytest.raises(LiverD2Error, match="INPUT.HU.NUM_SLICES"):
        LiverDatasetMapper(make_cfg(MODE="raw", NUM_SLICES=7), is_train=False)(d)


def test_rotation_fills_with_air_and_masks_on(tmp_path) -> None:
    d = make_dict(tmp_path)
    cfg = make_cfg({"MODEL.MASK_ON": True}, MODE="raw")
    mapper = LiverDatasetMapper(cfg, is_train=True,
                                geometric_augmentations=[T.RandomRotation([45.0, 45.0], expand=False)])
    out = mapper(d)
    assert out["image"][0, 0, 0].item() == pytest.approx(-1024.0)  # corner uncovered -> air
    assert out["instances"].gt_masks.tensor.shape == (1, H, W)


def test_chunked_warp_matches_per_channel_warp() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(0, 100, (H, W, 6)).astype(np.float32)
    tfms = T.TransformList([T.RotationTransform(H, W, 30.0, expand=False)])
    out = apply_image_transforms(tfms, img, -1024.0)
    per = np.stack([apply_image_transforms(tfms, img[..., c:c + 1], -1024.0)[..., 0] for c in range(6)], -1)
    assert out.shape == (H, W, 6)
    np.testing.assert_allclose(out, per, atol=1e-3)


def test_build_geometric_augmentations_respects_switch() -> None:
    cfg = make_cfg({"INPUT.AUG.ROTATION_DEG": 10.0, "INPUT.AUG.FLIP_H_PROB": 0.5})
    assert len(build_geometric_augmentations(cfg)) == 2
    cfg.INPUT.AUG.ENABLED = False
    assert build_geometric_augmentations(cfg) == []


@pytest.mark.parametrize(
    "hu, opts, key",
    [
        ({"MODE": "windowed"}, {}, "INPUT.HU.MODE"),
        ({}, {"MODEL.PIXEL_MEAN": [0.5, 0.5, 0.5]}, "MODEL.PIXEL_MEAN"),
        ({"NUM_SLICES": 4}, {}, "INPUT.HU.NUM_SLICES"),
    ],
)
def test_mapper_rejects_bad_config(hu: dict, opts: dict, key: str) -> None:
    cfg = get_cfg()
    add_liver_config(cfg)
    for k, v in hu.items():
        cfg.INPUT.HU[k] = v
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    with pytest.raises(LiverD2Error, match=key.replace(".", r"\.")):
        LiverDatasetMapper(cfg, is_train=True)


def test_channels_match_between_mapper_and_builder(tmp_path) -> None:
    d = make_dict(tmp_path)
    cfg = make_cfg(MODE="zscore", NUM_SLICES=3)
    out = LiverDatasetMapper(cfg, is_train=False)(d)
    from liver_d2.data.channels import read_dataset_stack
    expected = build_channels(read_dataset_stack(d, 3), ChannelSpec.from_cfg(cfg))
    np.testing.assert_array_equal(out["image"].numpy(), expected.transpose(2, 0, 1))


def test_hu_intensity_transforms_worked_by_hand() -> None:
    from liver_d2.data.augment import HUBrightnessTransform, HUContrastTransform, HUNoiseTransform

    hu = np.array([[0.0, 40.0, 100.0]], np.float32)
    np.testing.assert_allclose(HUBrightnessTransform(20.0).apply_image(hu), [[20, 60, 120]])
    np.testing.assert_allclose(HUContrastTransform(2.0, 40.0).apply_image(hu), [[-40, 40, 160]])
    noisy = HUNoiseTransform(10.0, seed=3).apply_image(np.zeros((64, 64), np.float32))
    assert abs(noisy.std() - 10.0) < 0.5
    assert (HUNoiseTransform(10.0, seed=3).apply_image(np.zeros((64, 64), np.float32)) == noisy).all()
    boxes = np.array([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(HUContrastTransform(2.0, 0.0).apply_box(boxes), boxes)


def test_brightness_acts_in_hu_before_channels(tmp_path) -> None:
    d = make_dict(tmp_path)
    cfg = make_cfg({"INPUT.AUG.BRIGHTNESS_HU": 50.0}, MODE="raw")
    np.random.seed(1)
    out = LiverDatasetMapper(cfg, is_train=True)(d)
    delta = out["image"].numpy()[0] - np.where(disc(20, 42, 6), TUMOR_HU, BG_HU)
    assert np.ptp(delta) < 1e-3 and 0 < abs(delta.mean()) <= 50  # one HU offset everywhere
    np.testing.assert_array_equal(out["instances"].gt_boxes.tensor.numpy()[0], [36, 14, 49, 27])
