"""Config keys of liver_d2, added to a detectron2 config as detectron2 projects do.

Usage::

    cfg = get_cfg()
    add_liver_config(cfg)
    cfg.merge_from_file("configs/....yaml")
    validate_liver_config(cfg)   # one-line LiverD2Error on a bad combination

The network input has ``num_input_channels(cfg)`` channels, so ``MODEL.PIXEL_MEAN`` and
``MODEL.PIXEL_STD`` (which detectron2 also uses to size the backbone's first conv) must
hold exactly that many values; :func:`set_default_pixel_stats` writes sensible ones
for the configured mode (see :func:`liver_d2.data.channels.default_pixel_stats`).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from liver_d2.data.channels import VALID_MODES, ChannelSpec, default_pixel_stats
from liver_d2.data.slicing import AXES
from liver_d2.errors import LiverD2Error
import liver_d2.modeling  # noqa: F401,E402  (registers the liver backbone and LiverRetinaNet)
from liver_d2.modeling.retinanet import CLS_LOSS_TYPES  # noqa: E402


def add_liver_config(cfg: CN) -> None:
    """Add the liver keys (with defaults) to a detectron2 config, in place."""
    _C = cfg

    # ---------------------------------------------------------------- HU -> channels
    _C.INPUT.HU = CN()
    # How HU become network input (liver_d2/data/channels.py builds it, for training and
    # volume inference alike):
    #   "raw"         HU unchanged, float32 (research "un-normalized" variant)
    #   "zscore"      per-slice (hu - mean) / max(std, ZSCORE_MIN_STD) (research "normalized")
    #   "window"      clip to WINDOWS[0] = [low, high] HU, then scale to [0, 1]
    #   "multiwindow" one [0, 1] channel group per entry of WINDOWS
    _C.INPUT.HU.MODE = "window"
    # HU windows as [[low, high], ...]. "window" uses the first, "multiwindow" all (in
    # order); ignored by raw/zscore. [-100, 400] covers liver (~60 HU), enhancing and
    # hypodense tumor; e.g. multiwindow [[-100, 400], [0, 200], [-1000, 1000]].
    _C.INPUT.HU.WINDOWS = [[-100.0, 400.0]]
    # 2.5D context: odd number K of neighbouring slices k-K//2 .. k+K//2 stacked as
    # channels (1 = plain 2D). Needs K <= 2R+1 stored context slices (R = context radius
    # used when preparing the data). Channel order is window-major:
    # channel = window_index * K + slice_offset, e.g. K=3 with windows A, B gives
    # A(k-1), A(k), A(k+1), B(k-1), B(k), B(k+1).
    _C.INPUT.HU.NUM_SLICES = 1
    # In-plane resampling: target mm per pixel; each slice is resized by
    # pixel_spacing / TARGET_SPACING (boxes too). 0 = keep the native grid (default).
    _C.INPUT.HU.TARGET_SPACING = 0.0
    # zscore mode: floor (HU) for a slice's std, so flat slices give 0, not inf/NaN.
    _C.INPUT.HU.ZSCORE_MIN_STD = 1.0
    # HU given to pixels that rotation, translation or zoom-out uncover (-1024 = air,
    # like the scan's surroundings; 0 would paint water into the corners).
    _C.INPUT.HU.PAD_VALUE = -1024.0
    # Two-stage detection, stage two: crop each slice to its liver region (the dataset's
    # per-slice liver box from the label, or at prediction a user's liver label or the
    # stage-one liver detector in STAGE1) widened by MARGIN pixels, resize the crop so its
    # longer side is SIZE pixels, and map boxes back to the full slice.
    _C.INPUT.LIVER_CROP = CN()
    _C.INPUT.LIVER_CROP.ENABLED = False
    _C.INPUT.LIVER_CROP.SIZE = 256
    _C.INPUT.LIVER_CROP.MARGIN = 8
    # Training output folder of the stage-one liver detector (used by the volume predictor
    # when no liver label is given); "" = a liver label is required at prediction.
    _C.INPUT.LIVER_CROP.STAGE1 = ""
    # Slices where stage one's best liver box scores below this are taken to hold no liver
    # (stage two skips them).
    _C.INPUT.LIVER_CROP.STAGE1_SCORE = 0.5
    # Axis the model's slices are cut along ("axial", "coronal", "sagittal"): the axis the
    # training data was prepared with (checked against its manifest), and the one the
    # volume predictor slices new scans along.
    _C.INPUT.SLICE_AXIS = "axial"

    # --------------------------------------------------------- training augmentation
    # All applied only when training, through detectron2 transforms so boxes follow;
    # boxes are recomputed from the transformed tumor mask (tight after rotation).
    _C.INPUT.AUG = CN()
    # Master switch; False = no augmentation at all.
    _C.INPUT.AUG.ENABLED = True
    # Probability of a left-right flip.
    _C.INPUT.AUG.FLIP_H_PROB = 0.5
    # Probability of an up-down (anterior-posterior) flip; 0 by default because test
    # scans never come upside down.
    _C.INPUT.AUG.FLIP_V_PROB = 0.0
    # Rotation by an angle ~ U(-ROTATION_DEG, ROTATION_DEG) degrees about the centre,
    # image size kept (expand=False); 0 = off.
    _C.INPUT.AUG.ROTATION_DEG = 10.0
    # Translation by up to this fraction of width/height in each direction; 0 = off.
    _C.INPUT.AUG.TRANSLATE_FRAC = 0.05
    # Scale jitter: zoom by s ~ U(lo, hi) about the centre, image size kept (crop when
    # s > 1, pad when s < 1); [1.0, 1.0] = off.
    _C.INPUT.AUG.SCALE_RANGE = [0.9, 1.1]
    # Training crop: square crops of CROP_SIZE pixels (after any TARGET_SPACING resize),
    # holding a tumor with probability CROP_TUMOR_PROB; 0 = whole slices. Testing always
    # runs whole slices. Crops make each CPU-second show the detector more tumors. Applied
    # even with ENABLED False: it is how training batches are cut, not an augmentation.
    _C.INPUT.AUG.CROP_SIZE = 0
    _C.INPUT.AUG.CROP_TUMOR_PROB = 0.5
    # Brightness: add an offset ~ U(-BRIGHTNESS_HU, BRIGHTNESS_HU) HU; 0 = off.
    _C.INPUT.AUG.BRIGHTNESS_HU = 10.0
    # Contrast: scale HU by c ~ U(lo, hi) around the slice mean; [1.0, 1.0] = off.
    _C.INPUT.AUG.CONTRAST_RANGE = [0.9, 1.1]
    # Gaussian noise with std ~ U(0, NOISE_STD_HU) HU; 0 = off.
    _C.INPUT.AUG.NOISE_STD_HU = 5.0

    # ----------------------------------------------------------------- negatives
    # Training: tumor-free slices kept per tumor slice (sampled with SEED, so runs
    # repeat); -1 keeps all negatives, 0 trains on tumor slices only.
    _C.DATALOADER.NEGATIVES_PER_POSITIVE = 1.0
    # detectron2 would drop images without annotations, i.e. every negative slice;
    # it must stay False whenever negatives are wanted (checked by validate_liver_config).
    _C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False

    # ------------------------------------------------------------- optimizer
    # "SGD" (detectron2's, with SOLVER.MOMENTUM) or "ADAMW" (betas 0.9/0.999, with
    # SOLVER.WEIGHT_DECAY). AdamW converges faster from scratch on short CPU schedules.
    _C.SOLVER.OPTIMIZER = "SGD"
    # Exponential moving average of the weights (liver_d2/engine/weight_average.py): the
    # average becomes the final model. DECAY near 1 averages more steps (0.999: ~1000).
    _C.SOLVER.EMA = CN()
    _C.SOLVER.EMA.ENABLED = False
    _C.SOLVER.EMA.DECAY = 0.999

    # Wall-clock budget for training, in whole seconds (0 = off: SOLVER.MAX_ITER as given).
    # Before training, a few timed steps of the real model on real batches measure this
    # machine; MAX_ITER becomes what fits in the budget (calibration included, rounded down
    # to 50, never above the configured MAX_ITER), and SOLVER.STEPS, SOLVER.CHECKPOINT_PERIOD,
    # TEST.EVAL_PERIOD and TEST.VAL_PERIOD shrink with it. CPUs differ by 2x, so a fixed
    # MAX_ITER either overruns "10 minutes" on a slow machine or wastes a fast one. Validation
    # and test passes are not counted. OUTPUT_DIR/time_budget.json records the measurement,
    # and --resume reuses its MAX_ITER. Runs repeat exactly only where they land on the same
    # MAX_ITER.
    _C.SOLVER.TIME_BUDGET = 0

    # ------------------------------------------------------------- model
    # Classification loss of MODEL.META_ARCHITECTURE "LiverRetinaNet"
    # (liver_d2/modeling/retinanet.py): "focal" (detectron2's RetinaNet) or "quality_focal"
    # (the score learns the IoU of the anchor's predicted box, so tight boxes outrank loose
    # ones; beta = MODEL.RETINANET.FOCAL_LOSS_GAMMA).
    _C.MODEL.RETINANET.CLS_LOSS_TYPE = "focal"

    # ------------------------------------------------------------- validation
    # Split used while training for the validation loss and validation AP (and so the
    # best checkpoint); DATASETS.TEST is evaluated once, after training and by --eval-only.
    _C.DATASETS.VAL = ()
    # Iterations between validation passes (loss in training mode under no_grad, then
    # COCO AP); 0 turns them off. The best checkpoint by validation AP is kept as
    # model_best.pth.
    _C.TEST.VAL_PERIOD = 0
    # Images of DATASETS.VAL used for the validation loss (0 = all): the loss is a trend
    # line, a few hundred slices are enough and keep the pass cheap.
    _C.TEST.VAL_LOSS_IMAGES = 0
    # PNG overlays of predictions (red, with scores) against ground truth (green) written
    # after each test evaluation, for the slices with the most tumors; 0 = none.
    _C.TEST.NUM_OVERLAYS = 8
    # Predictions below this score are left out of the overlays (not out of the metrics).
    _C.TEST.OVERLAY_SCORE_THRESH = 0.3

    # ------------------------------------------------------------- 3D lesions
    # Slice detections become 3D lesions (liver_d2/lesions.py): boxes on slices up to
    # 1 + MAX_GAP apart link when their 2D IoU >= LINK_IOU. Lesion metrics match
    # predicted to true lesions by 3D box IoU >= MATCH_IOU (0.1, as nnDetection / LUNA16).
    _C.TEST.LESIONS = CN()
    _C.TEST.LESIONS.ENABLED = True
    _C.TEST.LESIONS.LINK_IOU = 0.1
    _C.TEST.LESIONS.MAX_GAP = 1
    _C.TEST.LESIONS.MATCH_IOU = 0.1

    # ------------------------------------------------------------- pixel stats
    # One value per input channel (num_input_channels(cfg)); defaults fit the default
    # mode (window, 1 slice -> 1 channel, values in [0, 1]). Change both together with
    # INPUT.HU, e.g. via set_default_pixel_stats(cfg).
    mean, std = default_pixel_stats(_C.INPUT.HU.MODE, 1)
    _C.MODEL.PIXEL_MEAN = mean
    _C.MODEL.PIXEL_STD = std


def num_input_channels(cfg: CN) -> int:
    """Channels the mapper produces: NUM_SLICES x (len(WINDOWS) in multiwindow, else 1)."""
    return ChannelSpec.from_cfg(cfg).num_channels


def set_default_pixel_stats(cfg: CN) -> None:
    """Write MODEL.PIXEL_MEAN/STD suited to the configured mode and channel count."""
    spec = ChannelSpec.from_cfg(cfg)
    mean, std = default_pixel_stats(spec.mode, spec.num_channels)
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = mean, std
    if was_frozen:
        cfg.freeze()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LiverD2Error(message)


def _check_range(cfg_value: Any, key: str, positive: bool = True) -> None:
    """A [lo, hi] pair with lo <= hi (and lo > 0 when ``positive``)."""
    _check(len(cfg_value) == 2, f"{key}={list(cfg_value)} must be [lo, hi]")
    lo, hi = float(cfg_value[0]), float(cfg_value[1])
    _check(lo <= hi and (lo > 0 or not positive),
           f"{key}={[lo, hi]} must be [lo, hi] with {'0 < ' if positive else ''}lo <= hi")


def _validate_aug(aug: CN) -> None:
    for key in ("FLIP_H_PROB", "FLIP_V_PROB", "CROP_TUMOR_PROB"):
        _check(0.0 <= float(aug[key]) <= 1.0, f"INPUT.AUG.{key}={aug[key]} must be a probability in [0, 1]")
    for key in ("ROTATION_DEG", "BRIGHTNESS_HU", "NOISE_STD_HU"):
        _check(float(aug[key]) >= 0, f"INPUT.AUG.{key}={aug[key]} must be >= 0 (0 turns it off)")
    _check(0.0 <= float(aug.TRANSLATE_FRAC) < 0.5,
           f"INPUT.AUG.TRANSLATE_FRAC={aug.TRANSLATE_FRAC} must be in [0, 0.5)")
    _check_range(aug.SCALE_RANGE, "INPUT.AUG.SCALE_RANGE")
    _check_range(aug.CONTRAST_RANGE, "INPUT.AUG.CONTRAST_RANGE")
    _check(int(aug.CROP_SIZE) >= 0, f"INPUT.AUG.CROP_SIZE={aug.CROP_SIZE} must be >= 0 pixels (0 = whole slices)")


def validate_liver_config(cfg: CN) -> None:
    """Raise LiverD2Error (one line naming the key to change) on a bad liver config."""
    _check(hasattr(cfg.INPUT, "HU") and hasattr(cfg.INPUT, "AUG"),
           "config lacks INPUT.HU / INPUT.AUG; call liver_d2.config.add_liver_config(cfg) first")
    mode = cfg.INPUT.HU.MODE
    _check(mode in VALID_MODES, f"INPUT.HU.MODE={mode!r} is not a mode; set it to one of {', '.join(VALID_MODES)}")
    spec = ChannelSpec.from_cfg(cfg)  # mode, windows, NUM_SLICES, ZSCORE_MIN_STD
    n = spec.num_channels
    mean, std = default_pixel_stats(spec.mode, n)
    for key, values, suggestion in (("PIXEL_MEAN", cfg.MODEL.PIXEL_MEAN, mean), ("PIXEL_STD", cfg.MODEL.PIXEL_STD, std)):
        _check(len(values) == n,
               f"MODEL.{key} has {len(values)} values but the input has {n} channels "
               f"(INPUT.HU.MODE={spec.mode}, NUM_SLICES={spec.num_slices}, windows={spec.num_windows}); "
               f"set MODEL.{key} to {n} values, e.g. {suggestion}")
    _check(all(float(s) > 0 for s in cfg.MODEL.PIXEL_STD), f"MODEL.PIXEL_STD={list(cfg.MODEL.PIXEL_STD)} must be > 0")
    _check(float(cfg.INPUT.HU.TARGET_SPACING) >= 0,
           f"INPUT.HU.TARGET_SPACING={cfg.INPUT.HU.TARGET_SPACING} must be >= 0 mm (0 = native spacing)")
    _validate_aug(cfg.INPUT.AUG)
    _check(cfg.INPUT.SLICE_AXIS in AXES, f"INPUT.SLICE_AXIS={cfg.INPUT.SLICE_AXIS!r} is not an axis; set it to one of {', '.join(AXES)}")
    lesions = cfg.TEST.LESIONS
    _check(0 <= float(lesions.LINK_IOU) <= 1 and 0 < float(lesions.MATCH_IOU) <= 1 and int(lesions.MAX_GAP) >= 0,
           f"TEST.LESIONS LINK_IOU={lesions.LINK_IOU} / MATCH_IOU={lesions.MATCH_IOU} must lie in [0, 1] "
           f"(MATCH_IOU > 0) and MAX_GAP={lesions.MAX_GAP} must be >= 0")
    cls_loss = cfg.MODEL.RETINANET.CLS_LOSS_TYPE
    _check(cls_loss in CLS_LOSS_TYPES,
           f"MODEL.RETINANET.CLS_LOSS_TYPE={cls_loss!r} is not a loss; set it to one of {', '.join(CLS_LOSS_TYPES)}")
    _check(cls_loss == "focal" or cfg.MODEL.META_ARCHITECTURE == "LiverRetinaNet",
           f"MODEL.RETINANET.CLS_LOSS_TYPE={cls_loss!r} needs MODEL.META_ARCHITECTURE \"LiverRetinaNet\" "
           f"(it is {cfg.MODEL.META_ARCHITECTURE!r}, which would ignore it)")
    _check(cfg.SOLVER.OPTIMIZER in ("SGD", "ADAMW"),
           f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not an optimizer; set it to SGD or ADAMW")
    _check(not cfg.SOLVER.EMA.ENABLED or 0.0 < float(cfg.SOLVER.EMA.DECAY) < 1.0,
           f"SOLVER.EMA.DECAY={cfg.SOLVER.EMA.DECAY} must be in (0, 1), e.g. 0.999")
    _check(float(cfg.SOLVER.TIME_BUDGET) >= 0,
           f"SOLVER.TIME_BUDGET={cfg.SOLVER.TIME_BUDGET} must be >= 0 seconds (0 = off, MAX_ITER as given)")
    neg = float(cfg.DATALOADER.NEGATIVES_PER_POSITIVE)
    _check(neg >= 0 or neg == -1,
           f"DATALOADER.NEGATIVES_PER_POSITIVE={neg} must be >= 0, or -1 to keep all negatives")
    _check(neg == 0 or not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
           "DATALOADER.FILTER_EMPTY_ANNOTATIONS is True, which drops every negative slice; "
           "set it False (or DATALOADER.NEGATIVES_PER_POSITIVE 0)")


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """A checked, unfrozen config: detectron2 defaults + liver keys + file + ``KEY VALUE``
    overrides; ``cuda`` configs fall back to the CPU where no GPU is present, so the same
    files run on a laptop. Raises LiverD2Error (one line) on a missing file or bad key."""
    if not os.path.isfile(config_file):
        raise LiverD2Error(f"--config-file {config_file}: file not found")
    cfg = get_cfg()
    add_liver_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise LiverD2Error(f"{config_file}: {str(e).splitlines()[0]}") from None
    use_cpu_without_gpu(cfg)
    validate_liver_config(cfg)
    return cfg


def use_cpu_without_gpu(cfg: CN) -> None:
    """``cuda`` configs run on the CPU where no GPU is present, so one file serves both."""
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"
