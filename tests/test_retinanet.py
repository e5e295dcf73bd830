"""LiverRetinaNet: "focal" is detectron2's RetinaNet; "quality_focal" trains the score
toward the IoU of each positive anchor's predicted box (checked against numbers by hand)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from liver_d2.config import load_config
from liver_d2.errors import LiverD2Error
from liver_d2.modeling import quality_focal_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_quality_focal_loss_by_hand():
    logits = torch.tensor([[0.0], [math.log(3.0)], [-math.log(3.0)]])  # scores 0.5, 0.75, 0.25
    targets = torch.tensor([[0.0], [0.6], [0.0]])
    bce = [math.log(2.0), -(0.6 * math.log(0.75) + 0.4 * math.log(0.25)), -math.log(0.75)]
    expected = bce[0] * 0.5 ** 2 + bce[1] * 0.15 ** 2 + bce[2] * 0.25 ** 2
    assert quality_focal_loss(logits, targets, beta=2.0).item() == pytest.approx(expected, rel=1e-6)


def _model_and_batch(meta_arch: str, cls_loss: str):
    cfg = load_config(str(CONFIGS / "demo" / "retinanet_R18_phantom_cpu.yaml"),
                      ["MODEL.META_ARCHITECTURE", meta_arch, "MODEL.RETINANET.CLS_LOSS_TYPE", cls_loss])
    torch.manual_seed(0)
    model = build_model(cfg)
    image = torch.rand(3, 64, 64)
    instances = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 22.0, 25.0], [40.0, 40.0, 44.0, 43.0]])),
                          gt_classes=torch.tensor([0, 0]))
    return model, [{"image": image, "instances": instances, "height": 64, "width": 64}]


def _losses(meta_arch: str, cls_loss: str) -> dict:
    model, batch = _model_and_batch(meta_arch, cls_loss)
    with EventStorage():
        return {k: v.item() for k, v in model(batch).items()}


def test_focal_is_detectron2s_retinanet_and_quality_focal_differs_in_cls_only():
    d2 = _losses("RetinaNet", "focal")
    assert _losses("LiverRetinaNet", "focal") == d2
    qfl = _losses("LiverRetinaNet", "quality_focal")
    assert qfl["loss_box_reg"] == d2["loss_box_reg"]
    assert qfl["loss_cls"] != pytest.approx(d2["loss_cls"], rel=1e-3) and math.isfinite(qfl["loss_cls"])


def test_quality_focal_target_is_the_predicted_box_iou():
    """Recompute the loss from the model's own outputs: positive anchors' targets are the IoU
    of their decoded boxes with the matched truth, every other valid anchor's is 0."""
    from detectron2.structures.boxes import matched_pairwise_iou

    model, batch = _model_and_batch("LiverRetinaNet", "quality_focal")
    images = model.preprocess_image(batch)
    features = [model.backbone(images.tensor)[f] for f in model.head_in_features]
    anchors = model.anchor_generator(features)
    logits, deltas = model.head(features)
    logits = [x.permute(0, 2, 3, 1).reshape(1, -1, 1) for x in logits]
    deltas = [x.permute(0, 2, 3, 1).reshape(1, -1, 4) for x in deltas]
    labels, gt_boxes = model.label_anchors(anchors, [batch[0]["instances"]])
    with EventStorage():
        loss = model.losses(anchors, logits, labels, deltas, gt_boxes)["loss_cls"]

    pos = (labels[0] >= 0) & (labels[0] != model.num_classes)
    valid = labels[0] >= 0
    decoded = model.box2box_transform.apply_deltas(torch.cat(deltas, 1)[0][pos], Boxes.cat(anchors).tensor[pos])
    target = torch.zeros(len(labels[0]), 1)
    target[pos, 0] = matched_pairwise_iou(Boxes(decoded), Boxes(gt_boxes[0][pos])).clamp(min=0)
    expected = quality_focal_loss(torch.cat(logits, 1)[0][valid], target[valid], 2.0) / model.loss_normalizer
    assert pos.sum() > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("meta_arch, cls_loss, needle", [
    ("LiverRetinaNet", "iou", "CLS_LOSS_TYPE='iou' is not a loss"),
    ("RetinaNet", "quality_focal", 'needs MODEL.META_ARCHITECTURE "LiverRetinaNet"'),
])
def test_bad_cls_loss_config_is_one_line(meta_arch, cls_loss, needle):
    with pytest.raises(LiverD2Error, match=re.escape(needle)):
        _model_and_batch(meta_arch, cls_loss)
