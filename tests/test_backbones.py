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


@pytest.mark.parametrize("depth", [18, 34])
def test_liver_backbone_is_detectron2s_at_width_64_and_narrower_below(depth):
    """build_liver_resnet_fpn_backbone: at RES2_OUT_CHANNELS 64 the same tensors as
    detectron2's builder (so converted ImageNet weights load); at 32, half the widths."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    base = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", str(depth), "MODEL.FPN.OUT_CHANNELS", "32"]
    cfg = load_config(str(CONFIGS / "retinanet_R_18_FPN_windowed.yaml"), base)
    ours = load_config(str(CONFIGS / "retinanet_R_18_FPN_windowed.yaml"),
                       [*base, "MODEL.BACKBONE.NAME", "build_liver_resnet_fpn_backbone"])
    shapes = {k: v.shape for k, v in build_backbone(cfg, ShapeSpec(channels=1)).state_dict().items()}
    assert {k: v.shape for k, v in build_backbone(ours, ShapeSpec(channels=1)).state_dict().items()} == shapes

    ours.defrost()
    ours.MODEL.RESNETS.STEM_OUT_CHANNELS = ours.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    narrow = build_backbone(ours, ShapeSpec(channels=1))
    assert [narrow.bottom_up.output_shape()[f"res{i}"].channels for i in range(2, 6)] == [32, 64, 128, 256]
    features = narrow(torch.zeros(1, 1, 64, 64))
    assert features["p2"].shape == (1, 32, 16, 16) and features["p6"].shape == (1, 32, 1, 1)
