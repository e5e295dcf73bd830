"""Whole-scan inference: CT volumes in, 3D tumor findings out."""
from liver_d2.inference.predictor import VolumePrediction, VolumePredictor

__all__ = ["VolumePredictor", "VolumePrediction"]
