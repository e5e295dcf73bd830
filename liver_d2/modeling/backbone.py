"""A RetinaNet ResNet-FPN backbone whose basic-block ResNets may be narrower than 64.

Why not detectron2's ``build_retinanet_resnet_fpn_backbone``: it insists on
``RES2_OUT_CHANNELS = 64`` for R18/R34, the width of ImageNet models. A detector trained
from scratch on a CPU learns per gradient step, not per FLOP, and on the phantoms an R18 at
half width takes about half the time per step. The layout (stem, four stages, FPN, P6/P7
from res5) is detectron2's, built from its own classes; at width 64 the network is the
same as detectron2's R18/R34, so ImageNet-converted weights still load.
"""
from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, build_resnet_backbone

_BASIC_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def build_liver_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ResNet, with any ``RES2_OUT_CHANNELS`` for depths 18 and 34 (basic
    blocks; widths double per stage as usual). Deeper ResNets go to detectron2's builder."""
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _BASIC_BLOCKS:
        return build_resnet_backbone(cfg, input_shape)
    norm = cfg.MODEL.RESNETS.NORM
    in_channels = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS
    out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    stem = BasicStem(in_channels=input_shape.channels, out_channels=in_channels, norm=norm)
    stages = []
    for idx, num_blocks in enumerate(_BASIC_BLOCKS[depth]):
        stride = 1 if idx == 0 else 2
        stages.append(ResNet.make_stage(
            block_class=BasicBlock, num_blocks=num_blocks, stride_per_block=[stride] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, norm=norm,
        ))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=cfg.MODEL.RESNETS.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_liver_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """RetinaNet's ResNet-FPN (P6/P7 from res5) on :func:`build_liver_resnet`."""
    bottom_up = build_liver_resnet(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()["res5"].channels, out_channels),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
