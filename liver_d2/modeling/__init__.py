"""Model parts detectron2 lacks; importing this registers them (liver_d2.config does)."""
from liver_d2.modeling.backbone import build_liver_resnet_fpn_backbone, build_liver_resnet
from liver_d2.modeling.retinanet import LiverRetinaNet, quality_focal_loss

__all__ = ["build_liver_resnet_fpn_backbone", "build_liver_resnet", "LiverRetinaNet", "quality_focal_loss"]
