"""RetinaNet whose classification score can be trained to predict box quality.

Why: RetinaNet's focal loss gives every anchor with IoU >= the positive threshold a target
of 1, however loose the box it regresses to. On the phantoms most confident false positives
are such loose or partial boxes on real tumors (a box around a tumor at IoU 0.2-0.5), and
they outrank tight ones, so AP at IoU 0.5 and above suffers. The quality focal loss of
Generalized Focal Loss (Li et al., NeurIPS 2020) sets the positive target to the IoU of the
anchor's *predicted* box with its ground truth and weights the binary cross-entropy by
|score - target|^beta, so the score ranks boxes by how well they fit.

``MODEL.RETINANET.CLS_LOSS_TYPE``: "focal" is detectron2's RetinaNet unchanged;
"quality_focal" is the loss above with beta = ``FOCAL_LOSS_GAMMA`` (2 in the paper and by
default). Anchor labelling, box regression and inference are detectron2's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage

CLS_LOSS_TYPES = ("focal", "quality_focal")


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed QFL: BCE(sigmoid(logits), targets) * |sigmoid(logits) - targets|^beta.

    ``targets`` are soft, in [0, 1] (0 for background, the box IoU for positives)."""
    scores = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (bce * (scores - targets).abs().pow(beta)).sum()


@META_ARCH_REGISTRY.register()
class LiverRetinaNet(RetinaNet):
    """detectron2's RetinaNet with a choice of classification loss (see module doc)."""

    @configurable
    def __init__(self, *, cls_loss_type: str = "focal", **kwargs):
        super().__init__(**kwargs)
        if cls_loss_type not in CLS_LOSS_TYPES:
            raise ValueError(
                f"MODEL.RETINANET.CLS_LOSS_TYPE {cls_loss_type!r}: choose one of {', '.join(CLS_LOSS_TYPES)}"
            )
        self.cls_loss_type = cls_loss_type

    @classmethod
    def from_config(cls, cfg) -> dict:
        ret = super().from_config(cfg)
        ret["cls_loss_type"] = cfg.MODEL.RETINANET.CLS_LOSS_TYPE
        return ret

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        # detectron2's losses give the box loss and update the moving-average normaliser both
        # terms share; under "quality_focal" their focal term (cheap next to the convolutions)
        # is replaced rather than the rest of detectron2's loss code copied here.
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        if self.cls_loss_type == "focal":
            return losses
        gt_labels = torch.stack(gt_labels)  # (N, R)
        valid = gt_labels >= 0
        pos = valid & (gt_labels != self.num_classes)
        targets = torch.zeros(*gt_labels.shape, self.num_classes, device=gt_labels.device)
        if pos.any():
            with torch.no_grad():
                all_anchors = Boxes.cat(anchors).tensor  # (R, 4)
                deltas = cat(pred_anchor_deltas, dim=1)[pos]
                anchor_boxes = all_anchors.unsqueeze(0).expand(len(gt_labels), -1, -1)[pos]
                pred_boxes = self.box2box_transform.apply_deltas(deltas, anchor_boxes)
                iou = matched_pairwise_iou(Boxes(pred_boxes), Boxes(torch.stack(gt_boxes)[pos]))
            targets[pos, gt_labels[pos]] = iou.clamp(min=0.0).to(targets.dtype)
            get_event_storage().put_scalar("pos_anchor_iou", float(iou.mean()))
        logits = cat(pred_logits, dim=1)[valid]
        loss_cls = quality_focal_loss(logits, targets[valid].to(logits.dtype), self.focal_loss_gamma)
        losses["loss_cls"] = loss_cls / self.loss_normalizer
        return losses
