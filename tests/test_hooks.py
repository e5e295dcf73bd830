"""The validation pass measures the loss without changing anything training uses."""
from __future__ import annotations

from pathlib import Path

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from liver_d2.config import load_config
from liver_d2.engine.hooks import validation_loss
from liver_d2.engine.trainer import Trainer

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "retinanet_R18_phantom_cpu.yaml")


def batch(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(2):
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 20.0, 25.0]]))
        inst.gt_classes = torch.tensor([0])
        items.append({"image": torch.rand(1, 64, 64, generator=g), "instances": inst, "height": 64, "width": 64})
    return items


def test_validation_loss_changes_no_state() -> None:
    cfg = load_config(DEMO, ["MODEL.FPN.OUT_CHANNELS", "16", "MODEL.DEVICE", "cpu"])
    model = Trainer.build_model(cfg)
    model.train()
    with EventStorage() as storage:
        model(batch(0))  # one training-mode pass: BN statistics and the loss normaliser move
        storage.put_scalar("num_pos_anchors", 123.0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        normaliser = model.loss_normalizer
        losses = validation_loss(model, [batch(1), batch(2)])
        assert storage.latest()["num_pos_anchors"][0] == 123.0  # the trainer's storage is untouched
    assert set(losses) >= {"loss_cls", "loss_box_reg", "total_loss"} and losses["total_loss"] > 0
    assert model.training and model.loss_normalizer == normaliser
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
