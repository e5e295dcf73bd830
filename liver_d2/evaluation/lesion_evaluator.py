"""Lesion-level metrics inside detectron2's evaluation loop.

A DatasetEvaluator that collects the slice detections of a prepared split, links them
per volume into 3D lesions, and scores them against the 3D tumor components of each
volume's label map, so ``train_net.py --eval-only`` prints slice COCO AP and lesion
FROC / CPM together. Only the slices in the split are run: every tumor slice is there,
but tumor-free slices only as sampled when preparing (``--negatives-per-positive``), so
false positives per volume count those slices; prepare with ``--negatives-per-positive -1``
for every liver slice, or use ``tools/predict.py`` + ``tools/evaluate_volumes.py`` on
whole scans.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
from collections import OrderedDict, defaultdict
from typing import Optional

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from liver_d2.data.prepare import read_volume_record
from liver_d2.data.volumes import Case, read_case
from liver_d2.errors import LiverD2Error
from liver_d2.evaluation.lesion_metrics import (DEFAULT_IOU, LesionMetrics, evaluate_lesions, format_summary,
                                                write_lesion_metrics)
from liver_d2.lesions import ground_truth_lesions, link_slice_detections

logger = logging.getLogger(__name__)


def truth_lesions(case: Case) -> tuple[tuple[int, ...], list[dict]]:
    """Grid shape and ground-truth 3D lesions of a labelled scan, through the one reader.

    Cached per process: validation re-scores the same volumes every VAL_PERIOD, and
    re-reading every scan each time is the slow part. The label's file time is in the key,
    so a label rewritten during a run is read again. Callers must not change the lists.
    """
    mtime = os.path.getmtime(case.label) if os.path.exists(case.label) else None
    return _read_truth(case, mtime)


@functools.lru_cache(maxsize=64)
def _read_truth(case: Case, label_mtime: Optional[float]) -> tuple[tuple[int, ...], list[dict]]:
    volume = read_case(case)
    return volume.shape, ground_truth_lesions(volume.label, volume.spacing)


class LesionEvaluator(DatasetEvaluator):
    """3D lesion FROC, CPM, AP and recall by size over the volumes of a prepared split."""

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, link_iou: float = 0.1,
                 max_gap: int = 1, match_iou: float = DEFAULT_IOU, distributed: bool = True):
        meta = MetadataCatalog.get(dataset_name)
        self.prepared_dir = meta.get("prepared_dir")
        self.dataset_name = dataset_name
        self.output_dir = output_dir
        self.link_iou, self.max_gap, self.match_iou = link_iou, max_gap, match_iou
        self.distributed = distributed
        self.metrics: Optional[LesionMetrics] = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None) -> "LesionEvaluator":
        lesions = cfg.TEST.LESIONS
        return cls(dataset_name, output_dir, float(lesions.LINK_IOU), int(lesions.MAX_GAP), float(lesions.MATCH_IOU))

    def reset(self) -> None:
        self._detections: dict[str, list[dict]] = defaultdict(list)
        self._volumes: set[str] = set()

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            vid = inp.get("volume_id")
            if vid is None:
                continue
            self._volumes.add(vid)
            inst = out["instances"].to("cpu")
            for box, score in zip(inst.pred_boxes.tensor.tolist(), inst.scores.tolist()):
                self._detections[vid].append({"slice_index": int(inp["slice_index"]), "box": box, "score": score})

    def evaluate(self):
        volumes, detections = self._volumes, self._detections
        if self.distributed:
            comm.synchronize()
            gathered = comm.gather((self._volumes, dict(self._detections)), dst=0)
            if not comm.is_main_process():
                return {}
            volumes = set(itertools.chain.from_iterable(v for v, _ in gathered))
            detections = defaultdict(list)
            for _, dets in gathered:
                for vid, items in dets.items():
                    detections[vid].extend(items)
        if not volumes or self.prepared_dir is None:
            logger.warning(f"{self.dataset_name}: no volume ids in the split; lesion metrics skipped")
            return {}
        pairs = {}
        try:
            for vid in sorted(volumes):
                record = read_volume_record(self.prepared_dir, vid)
                axis = record["options"]["axis"]
                predicted = link_slice_detections(detections.get(vid, []), axis, record["shape"], record["spacing"],
                                                  link_iou=self.link_iou, max_gap=self.max_gap)
                pairs[vid] = (predicted, truth_lesions(Case(vid, record["image"], record["label"]))[1])
        except (LiverD2Error, OSError, KeyError, ValueError) as e:
            # the slice AP of a finished training run must not be lost to a moved label file
            logger.warning(f"{self.dataset_name}: lesion metrics skipped: {e}")
            return {}
        self.metrics = evaluate_lesions(pairs, self.match_iou)
        if self.output_dir:
            write_lesion_metrics(self.metrics, os.path.join(self.output_dir, "lesions"))
        logger.info(f"{self.dataset_name}: " + format_summary(self.metrics.summary))
        keep = {k: v for k, v in self.metrics.summary.items() if isinstance(v, float) and k != "iou_thresh"}
        return OrderedDict({"lesion": keep})


def evaluate_prediction_folder(pred_dir: str, data_root: str, match_iou: float = DEFAULT_IOU
                               ) -> tuple[LesionMetrics, list[str]]:
    """Score ``tools/predict.py`` JSON files against the label maps of a dataset folder
    (MSD or LiTS layout), matched by volume id. Returns the metrics and one line per
    prediction file that could not be scored (no label, other grid, unreadable)."""
    from liver_d2.data.volumes import find_cases

    cases = {c.volume_id: c for c in find_cases(data_root) if c.label}
    files = sorted(f for f in os.listdir(pred_dir) if f.endswith(".json")) if os.path.isdir(pred_dir) else []
    if not files:
        raise LiverD2Error(f"{pred_dir}: no prediction JSON files (run tools/predict.py first)")
    pairs, problems = {}, []
    for name in files:
        path = os.path.join(pred_dir, name)
        try:
            with open(path) as f:
                record = json.load(f)
            vid = record["volume_id"]
            lesions = record["lesions"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{path}: not a liver_d2 prediction file ({type(e).__name__}: {e})")
            continue
        if vid not in cases:
            problems.append(f"{path}: no label map for volume {vid!r} under {data_root}")
            continue
        try:
            shape, truths = truth_lesions(cases[vid])
        except LiverD2Error as e:
            problems.append(str(e))
            continue
        if list(shape) != list(record.get("shape", [])):
            problems.append(f"{path}: predicted on a {record.get('shape')} grid but {cases[vid].label} is {list(shape)}")
            continue
        pairs[vid] = (lesions, truths)
    if not pairs:
        raise LiverD2Error(f"{pred_dir}: none of {len(files)} prediction files could be scored: {problems[0]}")
    return evaluate_lesions(pairs, match_iou), problems
