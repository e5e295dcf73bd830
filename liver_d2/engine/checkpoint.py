"""Loading weights: detectron2 checkpoints, torchvision ResNets, safely where possible.

Checkpoints are pickles, and unpickling a file can run code stored in it. ``.pth`` files
are read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers; a file that needs full unpickling (detectron2 ``.pkl`` model-zoo files, or
``.pth`` files holding other Python objects) is loaded with a warning saying so.
"""
from __future__ import annotations

import logging
import pickle
import re
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from liver_d2.errors import LiverD2Error

logger = logging.getLogger(__name__)

STEM_KEY = "backbone.bottom_up.stem.conv1.weight"
_TORCHVISION_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def is_torchvision_resnet(state: dict) -> bool:
    return any(k.endswith("layer1.0.conv1.weight") for k in state) and not any(k.startswith("backbone.bottom_up") for k in state)


def torchvision_to_detectron2(state: dict) -> dict:
    """Rename a torchvision-layout ResNet state dict to detectron2's ResNet backbone names
    (as detectron2's own tools/convert-torchvision-to-d2.py does), dropping the classifier."""
    converted = {}
    for key, value in state.items():
        for prefix in _TORCHVISION_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if not key.startswith("layer"):
            key = "stem." + key
        for i in range(4):
            key = key.replace(f"layer{i + 1}", f"res{i + 2}")
        key = re.sub(r"bn(\d)", r"conv\1.norm", key)
        key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        converted["backbone.bottom_up." + key] = value
    return converted


def adapt_stem_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB stem filter for ``channels`` inputs: the filter's sum over RGB, split evenly,
    so a grey image repeated over the channels gives the same response as before."""
    return (weight.sum(dim=1, keepdim=True) / channels).repeat(1, channels, 1, 1)


class LiverCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that also reads torchvision ResNets and checks input channels."""

    def _torch_load(self, f: str) -> dict:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            logger.warning(
                f"{f}: holds Python objects beyond tensors, so it needs full unpickling, which can run "
                "code stored in the file; loading it because MODEL.WEIGHTS names it: only use files you trust"
            )
            return torch.load(f, map_location="cpu", weights_only=False)

    def _load_file(self, filename: str) -> dict:
        if filename.endswith(".pkl"):
            logger.warning(f"{filename}: .pkl files need full unpickling (it can run code): only use files you trust")
        self._loading = filename
        loaded = super()._load_file(filename)
        model = loaded.get("model", {})
        if is_torchvision_resnet(model):
            logger.info(f"{filename}: torchvision ResNet layout, converted to detectron2 names")
            loaded = {"model": torchvision_to_detectron2(model), "__author__": "torchvision"}
        return loaded

    def _load_model(self, checkpoint: Any):
        model_state = checkpoint["model"]
        if checkpoint.get("matching_heuristics"):  # Caffe2 / ImageNet .pkl: let detectron2 align names first
            from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

            self._convert_ndarray_to_tensor(model_state)
            model_state = align_and_update_state_dicts(
                self.model.state_dict(), model_state, c2_conversion=checkpoint.get("__author__") == "Caffe2")
            checkpoint["model"], checkpoint["matching_heuristics"] = model_state, False
        self._check_stem(model_state)
        return super()._load_model(checkpoint)

    def _check_stem(self, state: dict) -> None:
        """A trained detector must match the input channels; a pretrained backbone is adapted.
        Either must match the backbone's width (the demo's R18 is half as wide as ImageNet's)."""
        own = self.model.state_dict().get(STEM_KEY)
        theirs = state.get(STEM_KEY)
        if own is None or theirs is None or not hasattr(theirs, "shape"):
            return
        if theirs.shape[0] != own.shape[0]:  # detectron2 would skip every backbone tensor with a warning
            raise LiverD2Error(
                f"{getattr(self, '_loading', 'checkpoint')}: its backbone is {theirs.shape[0]} channels wide at the stem "
                f"but this config builds {own.shape[0]}; set MODEL.RESNETS.STEM_OUT_CHANNELS and RES2_OUT_CHANNELS "
                f"to {theirs.shape[0]} (ImageNet ResNets: 64)"
            )
        if theirs.shape[1] == own.shape[1]:
            return
        theirs = torch.as_tensor(theirs)
        if any(k.startswith("head.") for k in state):
            raise LiverD2Error(
                f"{getattr(self, '_loading', 'checkpoint')}: trained with {theirs.shape[1]} input channels but this config gives {own.shape[1]}; "
                "use the config.yaml saved next to the checkpoint (INPUT.HU.MODE/WINDOWS/NUM_SLICES, MODEL.PIXEL_MEAN)"
            )
        logger.info(f"adapting the pretrained stem from {theirs.shape[1]} to {own.shape[1]} input channels")
        state[STEM_KEY] = adapt_stem_channels(theirs.float(), own.shape[1])
        for key in ("pixel_mean", "pixel_std"):  # the RGB statistics do not apply to HU channels
            state.pop(key, None)
