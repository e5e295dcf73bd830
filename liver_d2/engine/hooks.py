"""Training hooks: validation loss and validation AP on the validation split."""
from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Callable, Iterator

import torch
from detectron2.engine import HookBase
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def frozen_training_state(model: torch.nn.Module) -> Iterator[None]:
    """Keep the model in training mode (so it returns losses) without letting the pass
    change anything training uses: BatchNorm running statistics are frozen, RetinaNet's
    running loss normaliser is restored, and the per-step scalars the model logs (such as
    num_pos_anchors) go to a throwaway EventStorage instead of the trainer's."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
    normalisers = {m: m.loss_normalizer for m in model.modules() if hasattr(m, "loss_normalizer")}
    for m in norms:
        m.eval()
    try:
        with EventStorage():
            yield
    finally:
        for m in norms:
            m.train()
        for m, value in normalisers.items():
            m.loss_normalizer = value


def validation_loss(model: torch.nn.Module, loader, max_images: int = 0) -> dict[str, float]:
    """Mean of each loss term over the validation images, computed the way training computes
    it (training mode, under no_grad, no update), averaged over all processes."""
    totals: dict[str, float] = {}
    count = 0
    batches = loader if max_images <= 0 else itertools.islice(loader, max_images)
    with torch.no_grad(), frozen_training_state(model):
        for batch in batches:
            losses = model(batch)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(batch)
            count += len(batch)
    gathered = comm.all_gather((totals, count))
    n = sum(c for _, c in gathered)
    summed = {k: sum(t.get(k, 0.0) for t, _ in gathered) / max(n, 1) for k in totals}
    summed["total_loss"] = sum(summed.values())
    return summed


class ValidationHook(HookBase):
    """Every ``period`` iterations (and at the end): the validation loss, then COCO AP on the
    validation split, both written to EventStorage (so to metrics.json and TensorBoard) as
    ``val/...``; a BestCheckpointer placed after this hook keeps the best AP."""

    def __init__(self, period: int, dataset_name: str, build_loader: Callable, build_evaluator: Callable,
                 max_loss_images: int = 0):
        self.period = period
        self.dataset_name = dataset_name
        self.build_loader = build_loader
        self.build_evaluator = build_evaluator
        self.max_loss_images = max_loss_images
        self._loader = None

    def _run(self) -> None:
        model = self.trainer.model
        if self._loader is None:
            self._loader = self.build_loader(self.dataset_name)
        was_training = model.training
        model.train()
        losses = validation_loss(model, self._loader, self.max_loss_images)
        results = inference_on_dataset(model, self._loader, self.build_evaluator(self.dataset_name))
        model.train(was_training)
        scalars = {f"val/{k}": v for k, v in losses.items()}
        for task, metrics in (results or {}).items():
            scalars.update({f"val/{task}/{k}": v for k, v in metrics.items() if v == v})  # drop NaN
        self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)  # AP exists on the main process only
        if comm.is_main_process():
            logger.info(f"validation on {self.dataset_name}: loss {losses['total_loss']:.4f}, "
                        f"AP {scalars.get('val/bbox/AP', float('nan')):.2f}, AP50 {scalars.get('val/bbox/AP50', float('nan')):.2f}")
        comm.synchronize()

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self.period > 0 and (next_iter % self.period == 0 or next_iter == self.trainer.max_iter):
            self._run()
