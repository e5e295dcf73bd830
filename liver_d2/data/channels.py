"""The one place where HU slices become network input channels.

Training (:class:`liver_d2.data.mapper.LiverDatasetMapper`) and inference on whole
volumes must build channels identically, or a model silently sees other numbers at test
time than it was trained on. Everything here works on float HU, never on 8-bit images.

Channel layout for a stack of K slices (k-R .. k+R, R = K // 2) and W windows
(W = 1 except in ``multiwindow`` mode) is **window-major**::

    channel c = w * K + s      (w = window index, s = slice index, s = R is slice k)

so with K = 3 and windows [A, B] the channels are
``A(k-1), A(k), A(k+1), B(k-1), B(k), B(k+1)``.

Value scales per mode:

* ``raw``         HU unchanged (float32), the research "un-normalized" variant.
* ``zscore``      per slice ``(hu - mean) / max(std, min_std)``; each of the K slices
                  uses its own statistics (the research "normalized" variant).
* ``window``      ``(clip(hu, low, high) - low) / (high - low)`` in [0, 1] with the
                  first window of the list.
* ``multiwindow`` the same [0, 1] scaling once per window of the list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from liver_d2.data.slice_io import HU_OFFSET, read_hu_slice
from liver_d2.errors import LiverD2Error

VALID_MODES = ("raw", "zscore", "window", "multiwindow")
WINDOWED_MODES = ("window", "multiwindow")

# Default MODEL.PIXEL_MEAN / PIXEL_STD value per channel for each mode. raw keeps the
# network input in HU (mean 0, std 1 = no normalisation, the point of that variant);
# zscore is already standardised; windows map [0, 1] to [-2, 2], about the range
# ImageNet-normalised images have.
_DEFAULT_STATS = {
    "raw": (0.0, 1.0),
    "zscore": (0.0, 1.0),
    "window": (0.5, 0.25),
    "multiwindow": (0.5, 0.25),
}


def _as_windows(windows: Any) -> tuple[tuple[float, float], ...]:
    """Normalise ``[[low, high], ...]`` (also a single ``[low, high]``) to float tuples."""
    try:
        wins = [tuple(float(v) for v in w) for w in windows]
    except TypeError:  # a flat [low, high]
        wins = [tuple(float(v) for v in windows)]
    return tuple(wins)  # type: ignore[return-value]


@dataclass(frozen=True)
class ChannelSpec:
    """How to turn K HU slices into channels; validated on creation."""

    mode: str = "window"
    windows: tuple[tuple[float, float], ...] = ((-100.0, 400.0),)
    num_slices: int = 1
    zscore_min_std: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", _as_windows(self.windows))
        if self.mode not in VALID_MODES:
            raise LiverD2Error(
                f"INPUT.HU.MODE={self.mode!r} is not a mode; set it to one of {', '.join(VALID_MODES)}"
            )
        if int(self.num_slices) != self.num_slices or self.num_slices < 1 or self.num_slices % 2 == 0:
            raise LiverD2Error(
                f"INPUT.HU.NUM_SLICES={self.num_slices} must be an odd integer >= 1 "
                "(slices centred on k: 1, 3, 5 ...)"
            )
        if self.mode in WINDOWED_MODES:
            if len(self.windows) == 0:
                raise LiverD2Error(f"INPUT.HU.WINDOWS is empty; mode {self.mode} needs [[low, high], ...] in HU")
            for w in self.windows:
                if len(w) != 2 or not w[0] < w[1]:
                    raise LiverD2Error(
                        f"INPUT.HU.WINDOWS entry {list(w)} must be [low, high] HU with low < high"
                    )
        if not self.zscore_min_std > 0:
            raise LiverD2Error(f"INPUT.HU.ZSCORE_MIN_STD={self.zscore_min_std} must be > 0 (HU)")

    @property
    def num_windows(self) -> int:
        """Windows that become channels: all in multiwindow, else one group."""
        return len(self.windows) if self.mode == "multiwindow" else 1

    @property
    def num_channels(self) -> int:
        """NUM_SLICES x windows; MODEL.PIXEL_MEAN/STD need this many values."""
        return self.num_slices * self.num_windows

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ChannelSpec":
        """Read the ``INPUT.HU`` keys added by :func:`liver_d2.config.add_liver_config`."""
        hu = cfg.INPUT.HU
        return cls(
            mode=str(hu.MODE),
            windows=_as_windows(hu.WINDOWS),
            num_slices=int(hu.NUM_SLICES),
            zscore_min_std=float(hu.ZSCORE_MIN_STD),
        )


def default_pixel_stats(mode: str, n_channels: int) -> tuple[list[float], list[float]]:
    """Sensible (PIXEL_MEAN, PIXEL_STD) for a mode, one value per channel."""
    if mode not in _DEFAULT_STATS:
        raise LiverD2Error(f"INPUT.HU.MODE={mode!r} is not a mode; set it to one of {', '.join(VALID_MODES)}")
    mean, std = _DEFAULT_STATS[mode]
    return [mean] * n_channels, [std] * n_channels


def window_hu(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] HU and scale to [0, 1] (float32)."""
    out = (np.clip(hu, low, high) - np.float32(low)) / np.float32(high - low)
    return out.astype(np.float32, copy=False)


def zscore_slices(hu: np.ndarray, min_std: float) -> np.ndarray:
    """Per-slice z-score of an (H, W, K) stack; the std floor keeps flat slices finite."""
    x = hu.astype(np.float64)
    mean = x.mean(axis=(0, 1), keepdims=True)
    std = np.maximum(x.std(axis=(0, 1), keepdims=True), min_std)
    return ((x - mean) / std).astype(np.float32)


def build_channels(hu: np.ndarray, spec: ChannelSpec) -> np.ndarray:
    """(H, W, K) or (H, W) HU -> (H, W, C) float32 network input, C = spec.num_channels."""
    if hu.ndim == 2:
        hu = hu[:, :, None]
    if hu.ndim != 3 or hu.shape[2] != spec.num_slices:
        raise LiverD2Error(
            f"HU stack has shape {hu.shape} but INPUT.HU.NUM_SLICES={spec.num_slices}; "
            "pass (H, W, NUM_SLICES) slices"
        )
    hu = hu.astype(np.float32, copy=False)
    if spec.mode == "raw":
        return np.ascontiguousarray(hu)
    if spec.mode == "zscore":
        return zscore_slices(hu, spec.zscore_min_std)
    windows = spec.windows[: spec.num_windows]
    return np.concatenate([window_hu(hu, lo, hi) for lo, hi in windows], axis=2)


def neighbour_indices(k: int, depth: int, num_slices: int) -> list[int]:
    """Slice indices k-R..k+R clamped to [0, depth-1]: edges repeat, as in ``context_files``."""
    if not 0 <= k < depth:
        raise LiverD2Error(f"slice index {k} outside a volume of {depth} slices")
    r = num_slices // 2
    return [min(max(i, 0), depth - 1) for i in range(k - r, k + r + 1)]


def stack_from_volume(volume: np.ndarray, k: int, num_slices: int) -> np.ndarray:
    """(D, H, W) HU volume -> (H, W, K) float32 stack around slice k (for volume inference)."""
    idx = neighbour_indices(k, volume.shape[0], num_slices)
    return np.ascontiguousarray(np.moveaxis(volume[idx].astype(np.float32), 0, -1))


def centred_context(dataset_dict: dict, num_slices: int) -> list[str]:
    """The K slice paths centred on ``file_name`` taken from the stored ``context_files``."""
    if num_slices == 1:
        return [dataset_dict["file_name"]]
    files: Sequence[str] = dataset_dict.get("context_files") or []
    n = len(files)
    if n < num_slices or n % 2 == 0:
        raise LiverD2Error(
            f"INPUT.HU.NUM_SLICES={num_slices} needs {num_slices} context slices but "
            f"{dataset_dict.get('file_name')} stores {n}; lower INPUT.HU.NUM_SLICES or "
            "prepare the data with a larger context radius"
        )
    start = (n - num_slices) // 2
    return list(files[start : start + num_slices])


def read_hu_stack(paths: Sequence[str], hu_offset: int = HU_OFFSET) -> np.ndarray:
    """Read 16-bit HU PNGs into an (H, W, K) float32 stack, checking equal shapes."""
    slices = [read_hu_slice(p, hu_offset) for p in paths]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise LiverD2Error(f"context slices differ in shape {sorted(shapes)}: {list(paths)}")
    return np.stack(slices, axis=-1).astype(np.float32)


def read_dataset_stack(dataset_dict: dict, num_slices: int) -> np.ndarray:
    """The (H, W, K) HU float32 stack a dataset dict describes."""
    paths = centred_context(dataset_dict, num_slices)
    return read_hu_stack(paths, int(dataset_dict.get("hu_offset", HU_OFFSET)))
