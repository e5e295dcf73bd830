"""CT volumes → stored HU slices, COCO JSON per split and a per-slice index table.

Two phases keep runs cheap to repeat and safe to kill:

1. per volume, in parallel (the expensive part): read through the one volume reader, cut
   slices, find tumor components, write 16-bit PNG slices and ``volumes/<id>.json``. That
   JSON is written last and atomically, so its presence means the volume is finished and a
   re-run skips it.
2. over all volumes (cheap): split by patient, sample negatives, write
   ``annotations/<split>.json``, ``index.csv``, the summary, and ``manifest.json`` last. The
   manifest is removed first, so a run killed half way never looks like a complete dataset.

Phase 2 reads only the per-volume JSONs, so re-splitting never re-reads a volume.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from liver_d2.data.slice_io import HU_OFFSET, PNG_COMPRESSION, write_hu_slice
from liver_d2.data.slicing import LIVER, TUMOR, check_axis, component_boxes, slice_boxes, slice_geometry, slice_stack
from liver_d2.data.volumes import Case, check_label_present, find_cases, read_case
from liver_d2.errors import LiverD2Error
from liver_d2.lesions import lesion_table

RECORD_VERSION = 2  # 2: per-slice liver boxes (two-stage liver crop)
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


@dataclass
class PrepareOptions:
    """Everything that decides what a prepared dataset holds (saved in its manifest)."""

    axis: str = "axial"
    connectivity: int = 8  # 2D connectivity of a tumor component (4 or 8)
    min_pixels: int = 0  # drop components smaller than this many pixels ...
    min_area_mm2: float = 0.0  # ... or smaller than this area
    context: int = 2  # neighbouring slices kept on each side, for 2.5D input
    store_all_slices: bool = False  # store every slice, not only liver/tumor slices ± context
    png_compression: int = PNG_COMPRESSION
    split_protocol: str = "random"  # random (by patient, seeded) | research (in order, 80/20)
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    negatives_per_positive: float = 1.0  # tumor-free liver slices per tumor slice; -1 = all
    workers: int = 2

    def volume_options(self) -> dict:
        """The options phase 1 depends on: a finished volume is reused only if they match."""
        return {k: getattr(self, k) for k in
                ("axis", "connectivity", "min_pixels", "min_area_mm2", "context", "store_all_slices")}

    def check(self) -> None:
        check_axis(self.axis)
        if self.split_protocol not in ("random", "research"):
            raise LiverD2Error(f"split protocol {self.split_protocol!r}: choose random or research")
        if len(self.split_ratios) != 3 or min(self.split_ratios) < 0 or sum(self.split_ratios) <= 0:
            raise LiverD2Error(f"split ratios {self.split_ratios}: need three non-negative numbers")
        if self.context < 0:
            raise LiverD2Error(f"context {self.context}: must be 0 or more slices")


@dataclass
class PrepareResult:
    out_dir: str
    summary: pd.DataFrame
    lesions: pd.DataFrame
    failures: list[str] = field(default_factory=list)
    skipped: int = 0


# ------------------------------------------------------------------------ phase 1


def slice_file(volume_id: str, axis: str, k: int) -> str:
    """Stored slice path, relative to the prepared dataset folder."""
    return f"slices/{volume_id}/{axis}_{k:04d}.png"


def volume_record_file(out_dir: str, volume_id: str) -> str:
    """Where a prepared volume's record (sources, geometry, boxes) lives."""
    return os.path.join(out_dir, "volumes", f"{volume_id}.json")


def read_volume_record(out_dir: str, volume_id: str) -> dict:
    with open(volume_record_file(out_dir, volume_id)) as f:
        return json.load(f)


def _atomic_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _stored_indices(relevant: np.ndarray, context: int, store_all: bool) -> np.ndarray:
    """Slices to write: liver/tumor slices widened by the 2.5D context (or all)."""
    if store_all:
        return np.arange(len(relevant))
    if context > 0 and relevant.any():
        relevant = ndimage.binary_dilation(relevant, iterations=context)
    return np.flatnonzero(relevant)


def prepare_volume(case: Case, out_dir: str, options: PrepareOptions) -> dict:
    """Phase 1 for one volume; returns its record (also written to ``volumes/<id>.json``)."""
    check_label_present(case)
    volume = read_case(case)
    axis = options.axis
    hu = slice_stack(volume.hu, axis)
    label = slice_stack(volume.label, axis)
    pixel_spacing, thickness = slice_geometry(volume.spacing, axis)
    tumor = label == TUMOR
    has_tumor = tumor.any(axis=(1, 2))
    has_liver = (label == LIVER).any(axis=(1, 2)) | has_tumor
    boxes, dropped = component_boxes(tumor, options.connectivity, options.min_pixels,
                                     options.min_area_mm2, pixel_spacing)
    stored = _stored_indices(has_liver, options.context, options.store_all_slices)
    liver_boxes = slice_boxes(label > 0)
    os.makedirs(os.path.join(out_dir, "slices", volume.volume_id), exist_ok=True)
    integral = np.issubdtype(hu.dtype, np.integer)
    for k in stored:
        # Non-integral HU (rare float NIfTIs) are rounded: 1 HU is far below CT noise.
        hu_slice = hu[k] if integral else np.clip(np.rint(hu[k]), -32768, 32767)
        write_hu_slice(os.path.join(out_dir, slice_file(volume.volume_id, axis, int(k))),
                       hu_slice, options.png_compression)
    lesions = lesion_table(volume.hu, volume.label, volume.spacing)
    record = {
        "version": RECORD_VERSION,
        "options": options.volume_options(),
        "volume_id": volume.volume_id,
        "image": case.image,
        "label": case.label,
        "shape": list(volume.shape),
        "spacing": list(volume.spacing),
        "num_slices": int(hu.shape[0]),
        "slice_shape": [int(hu.shape[1]), int(hu.shape[2])],
        "pixel_spacing": list(pixel_spacing),
        "slice_thickness": float(thickness),
        "has_liver": has_liver.tolist(),
        "has_tumor": has_tumor.tolist(),
        "liver_boxes": liver_boxes,
        "stored": stored.tolist(),
        "boxes": [asdict(b) for b in boxes],
        "dropped_components": dropped,
        "lesions": lesions[["diameter_mm", "contrast_hu", "voxels"]].to_dict("records"),
    }
    _atomic_json(volume_record_file(out_dir, volume.volume_id), record)
    return record


def _finished_record(case: Case, out_dir: str, options: PrepareOptions) -> Optional[dict]:
    if not os.path.exists(volume_record_file(out_dir, case.volume_id)):
        return None
    try:
        record = read_volume_record(out_dir, case.volume_id)
    except (json.JSONDecodeError, OSError):
        return None
    ok = record.get("version") == RECORD_VERSION and record.get("options") == options.volume_options()
    return record if ok else None


def _prepare_or_error(case: Case, out_dir: str, options: PrepareOptions) -> tuple[Case, Optional[dict], str]:
    """Run in a worker: a bad volume becomes a one-line message, never a dead pool."""
    try:
        return case, prepare_volume(case, out_dir, options), ""
    except LiverD2Error as e:
        return case, None, str(e)
    except Exception as e:  # noqa: BLE001 - report and go on with the other volumes
        return case, None, f"{case.image}: {type(e).__name__}: {e}"


def prepare_volumes(cases: list[Case], out_dir: str, options: PrepareOptions) -> tuple[list[dict], list[str], int]:
    """Phase 1 over all cases, in parallel, resuming finished ones."""
    os.makedirs(os.path.join(out_dir, "volumes"), exist_ok=True)
    records: dict[str, dict] = {}
    failures: list[str] = []
    todo = []
    for case in cases:
        done = _finished_record(case, out_dir, options)
        if done is not None:
            records[case.volume_id] = done
        else:
            todo.append(case)
    skipped = len(records)
    bar = tqdm(total=len(todo), desc="volumes", unit="vol", disable=not todo)

    def collect(result: tuple[Case, Optional[dict], str]) -> None:
        case, record, error = result
        if record is not None:
            records[case.volume_id] = record
        else:
            failures.append(error)
            tqdm.write(f"skipped: {error}")
        bar.update()

    if options.workers <= 1 or len(todo) <= 1:
        for case in todo:
            collect(_prepare_or_error(case, out_dir, options))
    else:
        with ProcessPoolExecutor(max_workers=options.workers) as pool:
            futures = [pool.submit(_prepare_or_error, c, out_dir, options) for c in todo]
            for future in as_completed(futures):
                collect(future.result())
    bar.close()
    ordered = [records[c.volume_id] for c in cases if c.volume_id in records]
    return ordered, failures, skipped


# ------------------------------------------------------------------------ phase 2


def positive_slices(record: dict) -> list[int]:
    """Slices with at least one kept tumor box."""
    return sorted({b["slice_index"] for b in record["boxes"]})


def assign_splits(records: list[dict], options: PrepareOptions) -> dict[str, str]:
    """volume id → split; a volume (patient) is never in two splits."""
    ids = [r["volume_id"] for r in records]
    ratios = np.asarray(options.split_ratios, dtype=float) / sum(options.split_ratios)
    if options.split_protocol == "research":
        return _research_splits(records, ratios)
    order = [ids[i] for i in np.random.default_rng(options.seed).permutation(len(ids))]
    counts = np.floor(ratios * len(ids)).astype(int)
    # Hand out the rounding remainder, first to splits that asked for volumes but got none.
    for _ in range(len(ids) - counts.sum()):
        wanting = [i for i in range(3) if ratios[i] > 0 and counts[i] == 0]
        i = wanting[0] if wanting else int(np.argmax(ratios * len(ids) - counts))
        counts[i] += 1
    splits: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        splits.update({vid: split for vid in order[start:start + count]})
        start += count
    return splits


def _research_splits(records: list[dict], ratios: np.ndarray) -> dict[str, str]:
    """The research notebooks' protocol: volumes in order until a split holds its share of
    tumor slices (test gets the rest; then train/val share train+val the same way)."""
    def cut(recs: list[dict], share: float) -> int:
        weights = np.array([len(positive_slices(r)) for r in recs], dtype=float)
        if weights.sum() == 0:
            return int(round(share * len(recs)))
        return int(np.searchsorted(np.cumsum(weights) / weights.sum(), share - 1e-9) + 1)

    trainval_share = ratios[0] + ratios[1]
    n_trainval = cut(records, trainval_share) if ratios[2] > 0 else len(records)
    trainval, test = records[:n_trainval], records[n_trainval:]
    n_train = cut(trainval, ratios[0] / trainval_share) if ratios[1] > 0 else len(trainval)
    splits = {r["volume_id"]: "train" for r in trainval[:n_train]}
    splits.update({r["volume_id"]: "val" for r in trainval[n_train:]})
    splits.update({r["volume_id"]: "test" for r in test})
    return splits


def select_slices(records: list[dict], splits: dict[str, str], options: PrepareOptions) -> dict[str, set]:
    """Per volume, the slices that become COCO images: every tumor slice plus sampled
    tumor-free liver slices (negatives), ``negatives_per_positive`` per tumor slice."""
    selected: dict[str, set] = {}
    for split_index, split in enumerate(SPLITS):
        recs = [r for r in records if splits[r["volume_id"]] == split]
        candidates = [(r["volume_id"], k) for r in recs for k, (liver, tumor)
                      in enumerate(zip(r["has_liver"], r["has_tumor"])) if liver and not tumor]
        n_pos = sum(len(positive_slices(r)) for r in recs)
        n_neg = len(candidates) if options.negatives_per_positive < 0 else \
            min(len(candidates), int(round(options.negatives_per_positive * n_pos)))
        rng = np.random.default_rng([options.seed, split_index])
        picked = rng.choice(len(candidates), size=n_neg, replace=False) if n_neg else []
        for r in recs:
            selected[r["volume_id"]] = set(positive_slices(r))
        for i in picked:
            vid, k = candidates[int(i)]
            selected[vid].add(k)
    return selected


def _context_files(record: dict, k: int, context: int, axis: str) -> list[str]:
    """Slices k-R..k+R, repeating the edge slice at the volume's ends (always 2R+1 names)."""
    last = record["num_slices"] - 1
    return [slice_file(record["volume_id"], axis, min(max(j, 0), last)) for j in range(k - context, k + context + 1)]


def build_coco(records: list[dict], selected: dict[str, set], options: PrepareOptions) -> dict:
    """COCO detection JSON for one split's records; extra image keys feed 2.5D and metrics."""
    images, annotations = [], []
    for record in records:
        boxes_by_slice: dict[int, list[dict]] = {}
        for box in record["boxes"]:
            boxes_by_slice.setdefault(box["slice_index"], []).append(box)
        height, width = record["slice_shape"]
        for k in sorted(selected[record["volume_id"]]):
            image_id = len(images) + 1
            images.append({
                "id": image_id,
                "file_name": slice_file(record["volume_id"], options.axis, k),
                "height": height,
                "width": width,
                "volume_id": record["volume_id"],
                "slice_index": k,
                "axis": options.axis,
                "pixel_spacing": record["pixel_spacing"],
                "slice_thickness": record["slice_thickness"],
                "has_liver": bool(record["has_liver"][k]),
                "has_tumor": bool(record["has_tumor"][k]),
                "liver_box": record["liver_boxes"][k],
                "context_files": _context_files(record, k, options.context, options.axis),
                "hu_offset": HU_OFFSET,
            })
            for box in boxes_by_slice.get(k, []):
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": box["bbox"],
                    "area": box["area"],
                    "iscrowd": 0,
                    "segmentation": box["rle"],
                })
    return {
        "info": {"description": "liver_d2 prepared slices", "version": str(RECORD_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "tumor", "supercategory": "liver"}],
    }


def index_table(records: list[dict], splits: dict[str, str], selected: dict[str, set], axis: str) -> pd.DataFrame:
    """One row per slice of every volume: what a user filters or re-splits on."""
    frames = []
    for r in records:
        n = r["num_slices"]
        counts = np.bincount([b["slice_index"] for b in r["boxes"]], minlength=n)
        stored = np.zeros(n, dtype=bool)
        stored[r["stored"]] = True
        frames.append(pd.DataFrame({
            "volume_id": r["volume_id"],
            "slice_index": np.arange(n),
            "axis": axis,
            "has_liver": r["has_liver"],
            "has_tumor": r["has_tumor"],
            "num_boxes": counts,
            "split": splits[r["volume_id"]],
            "in_coco": [k in selected[r["volume_id"]] for k in range(n)],
            "file_name": [slice_file(r["volume_id"], axis, k) if s else "" for k, s in enumerate(stored)],
        }))
    return pd.concat(frames, ignore_index=True)


def summary_table(records: list[dict], splits: dict[str, str], cocos: dict[str, dict]) -> pd.DataFrame:
    """Volumes, slices, images and boxes per split, with COCO size buckets."""
    rows = []
    for split in SPLITS:
        recs = [r for r in records if splits[r["volume_id"]] == split]
        coco = cocos[split]
        positives = {a["image_id"] for a in coco["annotations"]}
        areas = np.array([a["area"] for a in coco["annotations"]], dtype=float)
        rows.append({
            "split": split,
            "volumes": len(recs),
            "slices": sum(r["num_slices"] for r in recs),
            "images": len(coco["images"]),
            "tumor_images": len(positives),
            "negative_images": len(coco["images"]) - len(positives),
            "boxes": len(areas),
            "small": int((areas < 32**2).sum()),
            "medium": int(((areas >= 32**2) & (areas < 96**2)).sum()),
            "large": int((areas >= 96**2).sum()),
            "dropped_small_components": sum(r["dropped_components"] for r in recs),
        })
    table = pd.DataFrame(rows).set_index("split")
    table.loc["total"] = table.sum()
    return table


def lesion_summary(records: list[dict]) -> pd.DataFrame:
    """Distribution of 3D tumors: how hard the data is (size and contrast)."""
    lesions = pd.DataFrame([dict(volume_id=r["volume_id"], **les) for r in records for les in r["lesions"]])
    if lesions.empty:
        return pd.DataFrame()
    d, c = lesions["diameter_mm"], lesions["contrast_hu"]
    return pd.DataFrame({
        "lesions": [len(lesions)],
        "volumes_with_tumor": [lesions["volume_id"].nunique()],
        "diameter_mm_min": [d.min()], "diameter_mm_median": [d.median()], "diameter_mm_max": [d.max()],
        "under_10mm_%": [100.0 * (d < 10).mean()],
        "contrast_hu_min": [c.min()], "contrast_hu_median": [c.median()], "contrast_hu_max": [c.max()],
        "hypodense_%": [100.0 * (c < 0).mean()],
    }).round(2)


def write_splits(out_dir: str, records: list[dict], options: PrepareOptions, name: str,
                 source: str, failures: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Phase 2: splits, COCO JSONs, index table, summary and (last) the manifest."""
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # from here until the end the folder is "incomplete"
    splits = assign_splits(records, options)
    selected = select_slices(records, splits, options)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    cocos = {}
    for split in SPLITS:
        recs = [r for r in records if splits[r["volume_id"]] == split]
        cocos[split] = build_coco(recs, selected, options)
        _atomic_json(os.path.join(out_dir, "annotations", f"{split}.json"), cocos[split])
    index = index_table(records, splits, selected, options.axis)
    index.to_csv(os.path.join(out_dir, "index.csv.tmp"), index=False)
    os.replace(os.path.join(out_dir, "index.csv.tmp"), os.path.join(out_dir, "index.csv"))
    summary = summary_table(records, splits, cocos)
    lesions = lesion_summary(records)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(summary.to_string() + "\n\n" + lesions.to_string(index=False) + "\n")
    manifest = {
        "name": name,
        "source": os.path.abspath(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "options": asdict(options),
        "splits": {s: {"json": f"annotations/{s}.json", "images": len(cocos[s]["images"]),
                       "boxes": len(cocos[s]["annotations"]),
                       "volumes": sorted(v for v, sp in splits.items() if sp == s)} for s in SPLITS},
        "failures": failures,
    }
    _atomic_json(manifest_path, manifest)
    return summary, lesions


def prepare_dataset(source: str, out_dir: str, options: PrepareOptions, name: str) -> PrepareResult:
    """Prepare a whole MSD/LiTS folder; bad volumes are reported and skipped."""
    options.check()
    # absolute source paths in the records: lesion evaluation reads the labels again later,
    # from whatever folder the training runs in
    cases = find_cases(os.path.abspath(source))
    os.makedirs(out_dir, exist_ok=True)
    records, failures, skipped = prepare_volumes(cases, out_dir, options)
    if not records:
        raise LiverD2Error(f"{source}: none of {len(cases)} volumes could be prepared")
    summary, lesions = write_splits(out_dir, records, options, name, source, failures)
    return PrepareResult(out_dir=out_dir, summary=summary, lesions=lesions, failures=failures, skipped=skipped)
