#!/usr/bin/env python
"""Train or evaluate a liver-tumor RetinaNet with detectron2's conventions.

    python tools/train_net.py --config-file configs/demo/retinanet_R18_phantom_cpu.yaml
    python tools/train_net.py --config-file configs/retinanet_R_50_FPN_windowed.yaml --num-gpus 8
    python tools/train_net.py --config-file output/demo/config.yaml --eval-only \
        MODEL.WEIGHTS output/demo/model_final.pth

On a machine without a GPU, ``--num-gpus N`` runs N CPU processes over gloo.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import liver_d2.data.datasets  # noqa: F401  (registers the liver datasets)
from liver_d2.config import add_liver_config, validate_liver_config
from liver_d2.engine.trainer import Trainer, check_datasets, check_weights
from liver_d2.errors import LiverD2Error


def build_config(args):
    """Config from file + overrides, checked; raises LiverD2Error with one line on a problem."""
    cfg = get_cfg()
    add_liver_config(cfg)
    if not os.path.isfile(args.config_file):
        raise LiverD2Error(f"--config-file {args.config_file}: file not found")
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise LiverD2Error(f"{args.config_file}: {str(e).splitlines()[0]}") from None
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"  # the same configs run on a laptop
    validate_liver_config(cfg)
    check_datasets(cfg)
    check_weights(cfg)
    cfg.freeze()
    return cfg


def main(args):
    cfg = build_config(args)
    default_setup(cfg, args)  # logs, seeds, and saves config.yaml next to the checkpoints
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.build_checkpointer(model, cfg).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
            with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
                json.dump(results, f, indent=2)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None) -> int:
    args = default_argument_parser().parse_args(argv)
    try:
        build_config(args)  # fail early, in this process, with one line
    except LiverD2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
