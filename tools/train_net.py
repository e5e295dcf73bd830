#!/usr/bin/env python
"""Train or evaluate a liver-tumor RetinaNet with detectron2's conventions.

    python tools/train_net.py --config-file configs/demo/retinanet_R18_phantom_cpu.yaml
    python tools/train_net.py --config-file configs/retinanet_R_50_FPN_windowed.yaml --num-gpus 8
    python tools/train_net.py --config-file output/demo/config.yaml --eval-only \
        MODEL.WEIGHTS output/demo/model_final.pth

On a machine without a GPU, ``--num-gpus N`` runs N CPU processes over gloo.
"""
from __future__ import annotations

import sys

from detectron2.engine import default_argument_parser

from liver_d2.engine.launcher import run_train_net

if __name__ == "__main__":
    sys.exit(run_train_net(default_argument_parser().parse_args()))
