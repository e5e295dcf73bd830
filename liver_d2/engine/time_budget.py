"""``SOLVER.TIME_BUDGET``: size the schedule to a wall-clock training budget on this machine.

Why: the demo promises "10 minutes of CPU training", and CPUs differ: the same 2-core
recipe ran at 0.24 s per iteration one day and 0.40 s the next. A fixed MAX_ITER either
overruns on a slow machine or wastes a fast one. Here a few timed steps of the real model
on real batches set MAX_ITER *before* the trainer is built, so the learning-rate schedule,
checkpoints and validation all fit the new length (a schedule cut short mid-run would stop
at a high learning rate). The calibration model is thrown away, and train_net calls this
before detectron2's default_setup seeds the run, so a budgeted run that lands on N
iterations is the same run as one configured with N.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

logger = logging.getLogger(__name__)

RECORD = "time_budget.json"
WARMUP_STEPS = 3  # untimed: first steps pay for allocation and loader start-up
TIMED_STEPS = 12
ROUND_TO = 50  # iterations; nearby measurements then land on the same schedule
SCALED_KEYS = (("SOLVER", "CHECKPOINT_PERIOD"), ("TEST", "EVAL_PERIOD"), ("TEST", "VAL_PERIOD"))


def budgeted_iterations(budget_s: float, spent_s: float, seconds_per_iter: float, cap: int,
                        round_to: int = ROUND_TO) -> int:
    """Iterations that fit in what is left of the budget, rounded down to ``round_to``,
    at least ``round_to`` and at most ``cap``."""
    fit = int(max(budget_s - spent_s, 0.0) / seconds_per_iter) // round_to * round_to
    return max(min(round_to, cap), min(cap, fit))


def rescale_schedule(cfg, max_iter: int) -> None:
    """Set SOLVER.MAX_ITER on a defrosted cfg and shrink the iteration counts that are
    fractions of the run (LR steps, checkpoint, evaluation and validation periods) with it."""
    old = int(cfg.SOLVER.MAX_ITER)
    if max_iter == old:
        return
    scale = max_iter / old
    cfg.SOLVER.STEPS = tuple(max(1, round(s * scale)) for s in cfg.SOLVER.STEPS)
    for node, key in SCALED_KEYS:
        value = int(cfg[node][key])
        if value > 0:
            cfg[node][key] = max(1, round(value * scale))
    cfg.SOLVER.MAX_ITER = max_iter


def seconds_per_iteration(cfg, trainer_cls, timed_steps: int = TIMED_STEPS) -> float:
    """Mean time of ``timed_steps`` training steps (after WARMUP_STEPS untimed) of a
    throw-away model, optimizer and loader built exactly as training builds them."""
    model = trainer_cls.build_model(cfg)
    optimizer = trainer_cls.build_optimizer(cfg, model)
    loader = trainer_cls.build_train_loader(cfg)
    step = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, loader, optimizer)
    with EventStorage(0) as storage:
        step.storage = storage
        for i in range(WARMUP_STEPS + timed_steps):
            if i == WARMUP_STEPS:
                start = time.perf_counter()
            step.iter = i
            step.run_step()
            storage.iter = i + 1
    elapsed = time.perf_counter() - start
    del step, loader  # stops the loader's workers before training starts its own
    return elapsed / timed_steps


def _read_record(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def apply_time_budget(cfg, trainer_cls, resume: bool = False):
    """A copy of ``cfg`` whose schedule fits SOLVER.TIME_BUDGET on this machine (``cfg``
    itself when the budget is off). Every process measures; all take the slowest, so a
    multi-process run agrees on one MAX_ITER. With ``resume`` and an earlier record in
    OUTPUT_DIR, its MAX_ITER is reused: a resumed run must keep its schedule."""
    budget = float(cfg.SOLVER.TIME_BUDGET)
    if budget <= 0:
        return cfg
    cap = int(cfg.SOLVER.MAX_ITER)
    record = _read_record(cfg.OUTPUT_DIR) if resume else None
    source = f"from {RECORD}" if record else "measured now"
    if record is None:
        start = time.perf_counter()
        per_iter = seconds_per_iteration(cfg, trainer_cls)
        spent = time.perf_counter() - start
        per_iter, spent = max(comm.all_gather((per_iter, spent)))
        max_iter = budgeted_iterations(budget, spent, per_iter, cap)
        record = {"budget_s": budget, "calibration_s": round(spent, 2), "seconds_per_iteration": round(per_iter, 4),
                  "configured_max_iter": cap, "max_iter": max_iter}
        if comm.is_main_process():
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            with open(os.path.join(cfg.OUTPUT_DIR, RECORD), "w") as f:
                json.dump(record, f, indent=2)
    cfg = cfg.clone()
    cfg.defrost()
    rescale_schedule(cfg, int(record["max_iter"]))
    cfg.freeze()
    logger.info(f"SOLVER.TIME_BUDGET {budget:.0f} s at {record['seconds_per_iteration']:.3f} s/iteration "
                f"(calibration {record['calibration_s']:.0f} s, {source}): MAX_ITER {record['max_iter']} "
                f"of at most {record['configured_max_iter']}")
    return cfg
