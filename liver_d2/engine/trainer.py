"""``Trainer(DefaultTrainer)``: detectron2's training loop with the liver data path.

What changes from DefaultTrainer: the liver mapper for train and test loaders, negatives
sampled per tumor slice, COCO box evaluation, validation loss + AP hooks with the best
checkpoint kept, weights loaded through :class:`LiverCheckpointer`, and PNG overlays of
predictions next to each test evaluation.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict

import numpy as np
import torch
from detectron2.data import (DatasetCatalog, MetadataCatalog, build_detection_test_loader, build_detection_train_loader,
                             get_detection_dataset_dicts)
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from liver_d2.data.datasets import registered_split_problem
from liver_d2.data.liver_crop import SliceCoordinatesEvaluator
from liver_d2.data.mapper import LiverDatasetMapper
from liver_d2.engine.checkpoint import LiverCheckpointer
from liver_d2.engine.hooks import ValidationHook
from liver_d2.engine.weight_average import WeightAverage
from liver_d2.evaluation.lesion_evaluator import LesionEvaluator
from liver_d2.errors import LiverD2Error

logger = logging.getLogger(__name__)


def subsample_negatives(dicts: list[dict], per_positive: float, seed: int) -> list[dict]:
    """Keep every tumor slice and ``per_positive`` tumor-free slices per tumor slice
    (seeded, so runs repeat); -1 keeps all. Negatives teach the detector what liver without
    tumor looks like: the research code had none and paid in false positives."""
    positives = [d for d in dicts if d.get("annotations")]
    negatives = [d for d in dicts if not d.get("annotations")]
    if per_positive < 0 or len(negatives) <= per_positive * len(positives):
        return dicts
    n = int(round(per_positive * len(positives)))
    keep = np.random.default_rng(seed).choice(len(negatives), size=n, replace=False)
    chosen = positives + [negatives[i] for i in sorted(keep)]
    logger.info(f"training on {len(positives)} tumor slices and {n} of {len(negatives)} negatives")
    return chosen


def check_datasets(cfg, eval_only: bool = False) -> None:
    """Every dataset the config names is registered, and each one the run uses is prepared
    and not empty: one line saying what to do, before any process starts or any split is read."""
    registered = set(DatasetCatalog.list())
    used = ("TEST",) if eval_only else ("TRAIN", "VAL", "TEST")
    for key in ("TRAIN", "VAL", "TEST"):
        for name in cfg.DATASETS.get(key, ()):
            if name not in registered:
                liver = sorted(n for n in registered if n.startswith("liver_"))
                raise LiverD2Error(
                    f"DATASETS.{key} names {name!r}, which is not registered; prepare it with "
                    f"tools/prepare_data.py or use one of: {', '.join(liver)}"
                )
            problem = registered_split_problem(name) if key in used else None
            if problem:
                raise LiverD2Error(f"DATASETS.{key} {name!r}: {problem}")
            axis = MetadataCatalog.get(name).get("axis")
            if axis and axis != cfg.INPUT.SLICE_AXIS:
                raise LiverD2Error(
                    f"DATASETS.{key} {name!r} holds {axis} slices but INPUT.SLICE_AXIS is {cfg.INPUT.SLICE_AXIS}; "
                    f"set INPUT.SLICE_AXIS {axis} or prepare the data with --axis {cfg.INPUT.SLICE_AXIS}")


def check_weights(cfg) -> None:
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise LiverD2Error(f"MODEL.WEIGHTS={weights}: file not found; give a local .pth/.pkl file or '' to train from scratch")


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        """DefaultTrainer.__init__ with two changes it has no hook for: on the CPU, DDP must
        get no device_ids (detectron2 passes the local rank, which only fits GPUs), and the
        checkpointer is a LiverCheckpointer (torchvision ResNets, input-channel checks)."""
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = cfg.MODEL.DEVICE == "cpu"
        model = create_ddp_model(model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {}))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = LiverCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """detectron2's model, with the P6 / P7 convs frozen when the head does not read them.

        detectron2's RetinaNet FPN always builds P6 and P7; the liver configs read P2-P6 or
        P2-P5, so those convs never get a gradient, and DistributedDataParallel stops at the second
        iteration of any multi-process run ("Expected to have finished reduction ...")."""
        model = super().build_model(cfg)
        top_block = getattr(getattr(model, "backbone", None), "top_block", None)
        for level in ("p6", "p7"):
            if hasattr(top_block, level) and level not in cfg.MODEL.RETINANET.IN_FEATURES:
                getattr(top_block, level).requires_grad_(False)
        return model

    @staticmethod
    def build_checkpointer(model, cfg) -> LiverCheckpointer:
        """The checkpointer for evaluation and prediction (no trainer state)."""
        return LiverCheckpointer(model, cfg.OUTPUT_DIR)

    @classmethod
    def build_optimizer(cls, cfg, model):
        if cfg.SOLVER.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR,
                                              weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                              bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                                              weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS)
        optimizer = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        return maybe_add_gradient_clipping(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        dicts = subsample_negatives(dicts, cfg.DATALOADER.NEGATIVES_PER_POSITIVE, cfg.SEED if cfg.SEED >= 0 else 0)
        return build_detection_train_loader(cfg, dataset=dicts, mapper=LiverDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=LiverDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """Slice COCO AP, plus lesion-level FROC / CPM for prepared liver splits."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        coco = COCOEvaluator(dataset_name, tasks=("bbox",), distributed=True, output_dir=output_folder,
                             max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
        meta = MetadataCatalog.get(dataset_name)
        evaluator = coco
        if cfg.TEST.LESIONS.ENABLED and meta.get("prepared_dir") and meta.get("target", "tumor") == "tumor":
            evaluator = DatasetEvaluators([coco, LesionEvaluator.from_config(cfg, dataset_name, output_folder)])
        # two-stage: the model sees liver crops, the evaluators get full-slice boxes
        return SliceCoordinatesEvaluator(evaluator) if cfg.INPUT.LIVER_CROP.ENABLED else evaluator

    def build_hooks(self):
        cfg = self.cfg
        hook_list = super().build_hooks()
        if cfg.SOLVER.EMA.ENABLED:
            # before the checkpointer and the evaluators: the last step swaps the average in
            average = WeightAverage(cfg.SOLVER.EMA.DECAY)
            self.checkpointer.add_checkpointable("weight_average", average)
            hook_list.insert(next(i for i, h in enumerate(hook_list) if isinstance(h, hooks.LRScheduler)) + 1, average)
        if cfg.TEST.VAL_PERIOD > 0 and cfg.DATASETS.VAL:
            validation = [
                ValidationHook(cfg.TEST.VAL_PERIOD, cfg.DATASETS.VAL[0],
                               lambda name: self.build_test_loader(cfg, name),
                               lambda name: self.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference", f"{name}_latest")),
                               cfg.TEST.VAL_LOSS_IMAGES),
                hooks.BestCheckpointer(cfg.TEST.VAL_PERIOD, self.checkpointer, "val/bbox/AP", mode="max"),
            ]
            # before the writers, so each validation lands in the same metrics.json line
            writer_at = next((i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicWriter)), len(hook_list))
            hook_list[writer_at:writer_at] = validation
        return hook_list

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and cfg.TEST.NUM_OVERLAYS > 0:
            from liver_d2.evaluation.overlays import write_overlays

            for name in cfg.DATASETS.TEST:
                folder = os.path.join(cfg.OUTPUT_DIR, "inference", name)
                predictions = os.path.join(folder, "coco_instances_results.json")
                if os.path.exists(predictions):
                    write_overlays(name, predictions, os.path.join(folder, "overlays"), cfg)
        return results if isinstance(results, OrderedDict) else OrderedDict(results)
