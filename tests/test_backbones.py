"""Backbone configs R18/R34/R50/R101 load torchvision ResNet weights (ImageNet or any
checkpoint with that layout, e.g. medical-pretrained) into every backbone parameter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from liver_d2.config import load_config
from liver_d2.engine.checkpoint import STEM_KEY, adapt_stem_channels, torchvision_to_detectron2
from liver_d2.engine.trainer import Trainer

from conftest import load_and_check_backbone

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_every_backbone_parameter_is_loaded(tmp_path, depth):
    import torchvision

    torch.manual_seed(depth)
    tv = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    tv = {k: (v + torch.rand_like(v) + 0.5 if v.is_floating_point() else v) for k, v in tv.items()}
    # a medical-pretrained checkpoint saved from a wrapper: prefixed keys, its own head
    saved = {f"module.{k}": v for k, v in tv.items()}
    path = tmp_path / f"r{depth}.pth"
    torch.save(saved, path)
    cfg = load_config(str(CONFIGS / f"retinanet_R_{depth}_FPN_windowed.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.OUT_CHANNELS", "32",
                       "MODEL.RETINANET.NUM_CONVS", "1", "MODEL.WEIGHTS", str(path)])
    expected = torchvision_to_detectron2(tv)
    expected[STEM_KEY] = adapt_stem_channels(tv["conv1.weight"], 1)
    load_and_check_backbone(Trainer.build_model(cfg), str(path), expected)
