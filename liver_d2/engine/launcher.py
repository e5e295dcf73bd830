"""tools/train_net.py's work, in the package: config checks, launch, train or evaluate.

Errors a user can cause (bad config, unregistered or empty dataset, missing weights, a
checkpoint for other input channels) come out as one line and exit code 2, also when they
happen inside one of several launched processes.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys

import torch
from detectron2.engine import default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import liver_d2.data.datasets  # noqa: F401  (registers the liver datasets)
from liver_d2.config import load_config
from liver_d2.engine.time_budget import apply_time_budget
from liver_d2.engine.trainer import Trainer, check_datasets, check_weights
from liver_d2.errors import LiverD2Error

# detectron2's environment report (default_setup) imports torch.utils.cpp_extension, which
# prints "No CUDA runtime is found" to stderr where a CUDA toolkit sits next to a CPU-only
# torch: noise, not an error. Import it once quietly so stderr carries only real errors.
with contextlib.redirect_stderr(io.StringIO()):
    import torch.utils.cpp_extension  # noqa: F401,E402


def build_config(args):
    """Config from file + overrides, checked with the datasets and weights it names;
    raises LiverD2Error with one line on a problem."""
    cfg = load_config(args.config_file, args.opts)
    check_datasets(cfg, args.eval_only)
    check_weights(cfg)
    cfg.freeze()
    return cfg


def share_cpu_threads(cfg) -> None:
    """N CPU processes on one machine (``--num-gpus N`` without a GPU) split the cores, as
    torchrun does: each taking every core makes a 2-process run on 2 cores ~30x slower."""
    local = comm.get_local_size()
    if cfg.MODEL.DEVICE == "cpu" and local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, torch.get_num_threads() // local))


def main(args):
    cfg = build_config(args)
    share_cpu_threads(cfg)
    # our modules' messages (negatives sampled, time budget) into the run's log, as
    # detectron2 projects do for their own package
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="liver_d2", abbrev_name="liver_d2")
    if not args.eval_only:
        # before default_setup, so the config.yaml it saves holds the MAX_ITER that runs, and
        # the seeds it sets are not shifted by the calibration steps
        cfg = apply_time_budget(cfg, Trainer, resume=args.resume)
    default_setup(cfg, args)  # logs, seeds, and saves config.yaml next to the checkpoints
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.build_checkpointer(model, cfg).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
            write_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    # DefaultTrainer.train returns the final test results only with TEST.EXPECTED_RESULTS;
    # its EvalHook keeps them here
    results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process() and results:
        write_results(cfg, results)  # the final test evaluation, as --eval-only writes it
    return results


def write_results(cfg, results) -> str:
    """``OUTPUT_DIR/eval_results.json``: what reports (tools/compare.py) read."""
    path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    return path


def worker_error(e: BaseException) -> str | None:
    """The LiverD2Error message inside a failed worker's traceback (``--num-gpus N``), if any."""
    lines = str(e).strip().splitlines()
    prefix = f"{LiverD2Error.__module__}."
    if lines and lines[-1].startswith(prefix) and ": " in lines[-1]:
        return lines[-1].split(": ", 1)[1]
    return None


def run_train_net(args) -> int:
    """What tools/train_net.py does with its parsed arguments; returns the exit code."""
    try:
        build_config(args)  # fail early, in this process, with one line
        # Errors found later (a checkpoint for other input channels) come out of main();
        # with one process launch() calls it here, so they are one line too; with several,
        # the failed worker's error is picked out below (its siblings are stopped, as
        # expected, so torch's warning saying so is left out).
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except LiverD2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.multiprocessing.ProcessRaisedException as e:  # a worker's error, with its traceback
        message = worker_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0

