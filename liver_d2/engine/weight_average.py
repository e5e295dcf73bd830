"""Exponential moving average of the weights (EMA), used as the final model.

Why: from scratch on a short CPU schedule the weights at any one step are noisy: in the
demo recipe, validation AP50 rose about tenfold at the learning-rate drops alone. An
average of recent weights gives that smoothing at every step, without spending the
schedule at a low learning rate. BatchNorm running statistics are averaged alike.

The average replaces the model's weights after the last iteration, before the final
checkpoint and the test evaluation, so ``model_final.pth`` and everything downstream
(``--eval-only``, the predictor) use it. Mid-run validation, and so ``model_best.pth``,
use the training weights; :meth:`WeightAverage.applied` evaluates the average mid-run.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class WeightAverage(HookBase):
    """EMA of every float tensor of the model's state dict (integer buffers are copied).

    The effective decay ramps up as ``min(decay, (1 + it) / (10 + it))``, so the average
    does not stay anchored to the random initial weights on a short schedule. Its state is
    checkpointed (``trainer.checkpointer``), so ``--resume`` continues the same average.
    """

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.state: dict[str, torch.Tensor] = {}

    def before_train(self) -> None:
        if not self.state:  # a resumed run loaded it from the checkpoint already
            self.state = {k: v.detach().clone() for k, v in _unwrap(self.trainer.model).state_dict().items()}

    @torch.no_grad()
    def after_step(self) -> None:
        it = self.trainer.iter
        d = min(self.decay, (1.0 + it) / (10.0 + it))
        current = _unwrap(self.trainer.model).state_dict()
        floats = [k for k, v in current.items() if v.dtype.is_floating_point]
        averaged = [self.state[k] for k in floats]
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, [current[k].detach() for k in floats], alpha=1.0 - d)
        for k, v in current.items():
            if not v.dtype.is_floating_point:
                self.state[k].copy_(v)
        if it + 1 >= self.trainer.max_iter:
            _unwrap(self.trainer.model).load_state_dict(self.state)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model for the duration (e.g. a mid-run evaluation), then
        the training weights back."""
        model = _unwrap(self.trainer.model)
        training = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(training)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: v.clone() for k, v in state["state"].items()}
