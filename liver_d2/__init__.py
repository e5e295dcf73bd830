"""liver_d2: detectron2 RetinaNet for liver tumors on CT slices."""

__version__ = "0.1.0"
