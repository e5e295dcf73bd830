"""How visible each ground-truth tumor box is: one detectability index per box.

Why: a missed box is either the recipe's fault or the data's. With 10-18 HU noise and
tumors of 3-10 mm at 10-60 HU contrast, many phantom tumors are barely there, and an
accuracy target is only meaningful next to the share of boxes that any detector could
find. The index is the d' of a "footprint-mean" observer that knows the tumor's exact
footprint in slices k-1..k+1 (the demo model's 2.5D input): the tumor's mean HU against
the same footprint placed at every position where it lies wholly in tumor-free liver of
those slices. Those background placements carry the scan's real noise, its correlation,
the liver texture and the vessels, so no noise model is assumed.

It is a figure of difficulty, not a proof of impossibility: the ideal observer would also
prewhiten the liver texture and weigh the blurred edge, and a rim-enhancing tumor whose
rim and core cancel in the mean scores lower than it looks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage, signal
from tqdm import tqdm

from liver_d2.data.prepare import read_volume_record
from liver_d2.data.slicing import LIVER, TUMOR, coco_size_bucket, slice_stack
from liver_d2.data.volumes import Case, Volume, read_case
from liver_d2.errors import LiverD2Error
from liver_d2.lesions import box_iou, label_lesions

# Background placements, counted in footprint-sized tiles (overlapping placements share
# most of their pixels): below this a spread means little, and the footprint is shrunk.
MIN_BACKGROUND_TILES = 10
MAX_PARTS = 25  # parts of a big footprint tried per halving
EXCLUSION_PX = 2  # liver this close to a tumor carries its blurred edge: not background
D_PRIME_BINS = (0.0, 1.0, 2.0, 3.0, 5.0, np.inf)


@dataclass
class BoxVisibility:
    """The detectability of one tumor box (one 2D component on slice k)."""

    # (tumor mean - background median) / background spread, NaN if unmeasurable. Realised:
    # the tumor's own noise is in its mean, as it is in what a detector sees.
    d_prime: float
    contrast_hu: float  # tumor footprint mean minus background median
    background_sd_hu: float  # robust SD of the footprint mean over background placements
    p_background: float  # share of background placements at least as far out, same sign
    n_background: int  # background placements the figures rest on (overlapping)
    footprint_px: int  # pixels of the footprint over the slices used
    # Background spots in these slices at least as far out as the tumor: p_background times
    # the placements counted in footprint-box tiles. At 1 or more, ranking by this figure
    # puts a false positive level with the tumor in its own slice.
    rivals: float


def footprint(component: np.ndarray, label_stack: np.ndarray, centre: int, margin: int = 2) -> np.ndarray:
    """The tumor voxels of ``component``'s 3D lesion in a (K, H, W) label stack, kept within
    the component's box grown by ``margin`` px: what a 2.5D observer sees of this box.

    ``component`` is the 2D mask on slice ``centre`` of the stack. Neighbouring slices add
    the same lesion's cross-sections, not other lesions that happen to be near.
    """
    lesions, _ = label_lesions(label_stack == TUMOR)
    ids = np.unique(lesions[centre][component])
    ids = ids[ids > 0]
    shape = np.isin(lesions, ids)
    shape[centre] = component  # the box is this component, however the lesion branches
    rows, cols = np.nonzero(component)
    box = np.zeros(component.shape, bool)
    box[max(rows.min() - margin, 0): rows.max() + margin + 1, max(cols.min() - margin, 0): cols.max() + margin + 1] = True
    return shape & box[None]


def background_region(label_stack: np.ndarray, exclusion_px: int = EXCLUSION_PX) -> np.ndarray:
    """Tumor-free liver, at least ``exclusion_px`` pixels (in-plane) from any tumor."""
    tumor = label_stack == TUMOR
    if exclusion_px > 0 and tumor.any():
        grow = np.zeros((3, 3, 3), bool)
        grow[1] = ndimage.generate_binary_structure(2, 2)
        tumor = ndimage.binary_dilation(tumor, grow, iterations=exclusion_px)
    return (label_stack == LIVER) & ~tumor


def _placements(stack: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sum of ``stack`` under ``kernel`` at every position where the kernel fits in the
    image (one value per top-left corner), summed over the K slices: a correlation."""
    out = None
    for plane, k in zip(stack, kernel):
        if not k.any():
            continue
        s = signal.fftconvolve(plane, k[::-1, ::-1], mode="valid")
        out = s if out is None else out + s
    return out


def _windows(shape: np.ndarray, centre: int) -> list[np.ndarray]:
    """Parts of a footprint inside a window of half its larger side: centred on the centre
    slice's centroid (a big tumor's core, which fits between its liver's edges) and also
    shifted by half a window up, down, left and right, since a rim tumor's
    core and rim cancel in the mean where its wall alone does not."""
    _, ys, xs = np.nonzero(shape)
    rows, cols = np.nonzero(shape[centre]) if shape[centre].any() else (ys, xs)
    r, c = int(round(rows.mean())), int(round(cols.mean()))
    half = max(int(ys.max() - ys.min()), int(xs.max() - xs.min())) // 4
    offsets = [(0, 0), (-half, 0), (half, 0), (0, -half), (0, half)]
    parts = []
    for dr, dc in offsets:
        window = np.zeros(shape.shape[1:], bool)
        window[max(r + dr - half, 0): max(r + dr + half + 1, 0), max(c + dc - half, 0): max(c + dc + half + 1, 0)] = True
        part = shape & window[None]
        if part.any() and part.sum() < shape.sum():
            parts.append(part)
    return parts


def _measure(hu: np.ndarray, background_mask: np.ndarray, shape: np.ndarray, min_tiles: int) -> BoxVisibility:
    """The figures for one footprint; NaN d' when the background holds fewer than
    ``min_tiles`` footprint-box tiles of placements."""
    _, rows, cols = np.nonzero(shape)
    kernel = shape[:, rows.min(): rows.max() + 1, cols.min(): cols.max() + 1].astype(np.float64)
    n = float(kernel.sum())
    tile = kernel.shape[1] * kernel.shape[2]
    covered = _placements(background_mask, kernel)
    background = (_placements(hu, kernel) / n)[covered > n - 0.5]  # every footprint voxel on background
    if len(background) < min_tiles * tile:
        nan = float("nan")
        return BoxVisibility(nan, nan, nan, nan, len(background), int(n), nan)
    median = float(np.median(background))
    spread = float(1.4826 * np.median(np.abs(background - median)))  # robust to vessels in the liver
    contrast = float(hu[shape].mean()) - median
    beyond = background - median
    p = float(np.mean(beyond <= contrast) if contrast < 0 else np.mean(beyond >= contrast))
    d_prime = abs(contrast) / spread if spread > 0 else float("inf")
    return BoxVisibility(d_prime, contrast, spread, p, len(background), int(n), p * len(background) / tile)


def box_visibility(hu_stack: np.ndarray, label_stack: np.ndarray, component: np.ndarray, centre: int,
                   min_tiles: int = MIN_BACKGROUND_TILES) -> BoxVisibility:
    """d' of one tumor component on slice ``centre`` of (K, H, W) HU and label stacks.

    K = 1 gives the 2D figure; K = 3 with the component's slice in the middle the 2.5D one.
    A footprint whose background placements cover fewer than ``min_tiles`` footprint-box
    tiles of tumor-free liver is cut into parts of half its size, and those again, until
    some fit; the best part counts: a lower bound, as an observer may use any part.
    """
    hu = hu_stack.astype(np.float64)
    background_mask = background_region(label_stack).astype(np.float64)
    shape = footprint(component, label_stack, centre)
    best = _measure(hu, background_mask, shape, min_tiles)
    candidates = [shape] if np.isnan(best.d_prime) else []
    while candidates:
        parts = {}
        for candidate in candidates:
            for part in _windows(candidate, centre):
                parts.setdefault(np.packbits(part).tobytes(), part)
        candidates = list(parts.values())[:MAX_PARTS]
        results = [_measure(hu, background_mask, part, min_tiles) for part in candidates]
        measured = [r for r in results if not np.isnan(r.d_prime)]
        if measured:
            return max(measured, key=lambda r: r.d_prime)
        best = results[0] if results else best
    return best


def context_stack(volume: np.ndarray, k: int, num_slices: int) -> tuple[np.ndarray, int]:
    """Slices around k of a (D, H, W) stack, cut at the volume's ends (no repeats: a repeated
    slice would count its noise twice), and the index of slice k in the result."""
    radius = num_slices // 2
    lo, hi = max(k - radius, 0), min(k + radius + 1, volume.shape[0])
    return volume[lo:hi], k - lo


def d_prime_bin(d_prime: np.ndarray) -> np.ndarray:
    """Bin labels ("<1", "1-2", ..., ">=5", "n/a") for a summary table."""
    labels = []
    for lo, hi in zip(D_PRIME_BINS[:-1], D_PRIME_BINS[1:]):
        labels.append(f"<{hi:g}" if lo == 0 else f">={lo:g}" if np.isinf(hi) else f"{lo:g}-{hi:g}")
    d = np.asarray(d_prime, dtype=np.float64)
    idx = np.digitize(np.nan_to_num(d, nan=-1.0), D_PRIME_BINS[1:-1])
    return np.where(np.isnan(d), "n/a", np.asarray(labels, dtype=object)[idx])


def _component_mask(annotation: dict, shape: tuple[int, int]) -> np.ndarray:
    """The annotation's stored component mask (COCO RLE) as a bool (H, W) array."""
    rle = dict(annotation["segmentation"])
    if isinstance(rle.get("counts"), str):
        rle["counts"] = rle["counts"].encode("ascii")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != shape:
        raise LiverD2Error(f"mask of {mask.shape} on a slice of {shape}; re-prepare the dataset")
    return mask


def _predictions_by_image(predictions: Optional[list[dict]], score_thresh: float) -> dict[int, np.ndarray]:
    """COCO results (XYWH) -> per image id, the XYXY boxes scoring at least ``score_thresh``."""
    out: dict[int, list] = {}
    for p in predictions or []:
        if p["score"] >= score_thresh:
            x, y, w, h = p["bbox"]
            out.setdefault(int(p["image_id"]), []).append([x, y, x + w, y + h])
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def volume_visibility(volume: Volume, images: list[dict], coco: COCO, num_slices: int,
                      predicted: Optional[dict[int, np.ndarray]] = None) -> list[dict]:
    """Rows for the boxes on one volume's slices (COCO image entries of a prepared split)."""
    axis = images[0].get("axis", "axial")
    hu, label = slice_stack(volume.hu, axis), slice_stack(volume.label, axis)
    rows = []
    for image in images:
        k = int(image["slice_index"])
        hu_ctx, centre = context_stack(hu, k, num_slices)
        label_ctx, _ = context_stack(label, k, num_slices)
        for anno in coco.imgToAnns[image["id"]]:
            mask = _component_mask(anno, hu.shape[1:])
            x, y, w, h = anno["bbox"]
            row = {"ann_id": anno["id"], "volume_id": image["volume_id"], "slice_index": k, "image_id": image["id"],
                   "x0": x, "y0": y, "x1": x + w, "y1": y + h, "area": int(anno["area"]),
                   "size": coco_size_bucket(anno["area"]),
                   **asdict(box_visibility(hu_ctx, label_ctx, mask, centre))}
            if predicted is not None:
                boxes = predicted.get(image["id"], np.zeros((0, 4)))
                row["best_iou"] = float(box_iou([x, y, x + w, y + h], boxes, 2).max()) if len(boxes) else 0.0
            rows.append(row)
    return rows


def split_visibility(coco: COCO, prepared_dir: str, num_slices: int = 3,
                     predictions: Optional[list[dict]] = None, score_thresh: float = 0.05,
                     ) -> tuple[pd.DataFrame, list[str]]:
    """One row per ground-truth box of a prepared split (its COCO JSON), and the volumes
    that failed.

    Each volume is read once, through the one reader, for the label the stored slices
    lack (background must be tumor-free *liver*). With ``predictions`` (COCO results of the
    same split), ``best_iou`` is each box's best overlap with a prediction of at least
    ``score_thresh``, so recall can be read against d'.
    """
    by_volume: dict[str, list[dict]] = {}
    for image in coco.dataset["images"]:
        if coco.imgToAnns[image["id"]]:
            by_volume.setdefault(image["volume_id"], []).append(image)
    predicted = _predictions_by_image(predictions, score_thresh) if predictions is not None else None
    rows, failures = [], []
    for vid, images in tqdm(sorted(by_volume.items()), desc="detectability", unit="vol"):
        try:
            record = read_volume_record(prepared_dir, vid)
            volume = read_case(Case(vid, record["image"], record["label"]))
            rows += volume_visibility(volume, images, coco, num_slices, predicted)
        except (LiverD2Error, OSError, KeyError, ValueError) as e:
            failures.append(f"{vid}: {e}")
    return pd.DataFrame(rows), failures


def summarize_visibility(table: pd.DataFrame, iou: float = 0.5) -> pd.DataFrame:
    """Boxes per d' bin: share, cumulative share, count per COCO size, share with a rival
    in their own slices, and the share found at ``iou`` when the table has ``best_iou``."""
    table = table.assign(bin=d_prime_bin(table["d_prime"].to_numpy()))
    order = [b for b in d_prime_bin(np.array([0.5, 1.5, 2.5, 4.0, 9.0, np.nan])) if b in set(table["bin"])]
    grouped = table.groupby("bin")
    out = pd.DataFrame({"boxes": grouped.size()}).reindex(order)
    out["share"] = out["boxes"] / len(table)
    out["cumulative"] = out["share"].cumsum()
    for size in ("small", "medium", "large"):
        if (table["size"] == size).any():
            out[size] = table[table["size"] == size].groupby("bin").size().reindex(order).fillna(0).astype(int)
    out["with_rival"] = grouped["rivals"].apply(lambda s: float((s >= 1).mean())).reindex(order)
    if "best_iou" in table:
        out[f"found@{iou:g}"] = grouped["best_iou"].apply(lambda s: float((s >= iou).mean())).reindex(order)
    return out
