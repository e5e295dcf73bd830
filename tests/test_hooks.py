"""The validation pass measures the loss without changing anything training uses; the
weight average is the EMA worked out by hand and ends up as the model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from liver_d2.config import load_config
from liver_d2.engine.hooks import validation_loss
from liver_d2.engine.trainer import Trainer
from liver_d2.engine.weight_average import WeightAverage

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


class _Scale(torch.nn.Module):
    """One weight and one integer buffer: the average is easy to work out by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, _batch) -> dict:
        self.steps += 1
        return {"loss": -self.w.sum()}  # SGD at lr 1 adds 1 to w per step


def test_weight_average_is_the_ema_and_becomes_the_final_model() -> None:
    from detectron2.engine import SimpleTrainer

    model = _Scale()
    trainer = SimpleTrainer(model, iter([None] * 10), torch.optim.SGD(model.parameters(), lr=1.0))
    average = WeightAverage(decay=0.5)
    trainer.register_hooks([average])
    trainer.train(0, 5)
    expected = 0.0  # w after step i is i + 1; decay min(0.5, (1 + i) / (10 + i))
    for i in range(5):
        d = min(0.5, (1 + i) / (10 + i))
        expected = d * expected + (1 - d) * (i + 1)
    assert model.w.item() == pytest.approx(expected) and expected < 5  # the average, not the last weights
    assert model.steps.item() == 5  # integer buffers are copied, not averaged
    with torch.no_grad():
        model.w.fill_(99.0)
    with average.applied():  # a mid-run evaluation sees the average ...
        assert model.w.item() == pytest.approx(expected)
    assert model.w.item() == 99.0  # ... and training continues from its own weights
    restored = WeightAverage(decay=0.5)
    restored.load_state_dict(average.state_dict())
    assert torch.equal(restored.state["w"], average.state["w"])


def test_weight_average_rejects_a_decay_outside_0_1() -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(decay=1.0)
