"""Prepared splits → detectron2 DatasetCatalog / MetadataCatalog, by name.

Like detectron2's ``DETECTRON2_DATASETS``, the root comes from ``LIVER_D2_DATASETS``
(default ``./datasets``), so configs name datasets only (``liver_phantom_train``). Every
prepared folder ``<root>/<name>/`` with a ``manifest.json`` registers ``<name>_<split>``;
the built-in names register even before preparation, so using one too early says how to
prepare it instead of "not registered".
"""
from __future__ import annotations

import json
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from liver_d2.data.prepare import MANIFEST, SPLITS, read_volume_record
from liver_d2.errors import LiverD2Error

ENV_ROOT = "LIVER_D2_DATASETS"
# What a split's boxes mark: "tumor" (<name>_<split>) or, for stage one of the two-stage
# detector, "liver" (<name>_liver_<split>: one box around the liver on each slice).
TARGETS = ("tumor", "liver")
BUILTIN = {  # prepared folder name → how to make it
    "liver_phantom": "python tools/make_phantoms.py && python tools/prepare_data.py --source datasets/phantoms",
    "liver_msd": "python tools/prepare_data.py --source datasets/Task03_Liver (see datasets/README.md)",
    "liver_lits": "python tools/prepare_data.py --source datasets/LiTS (see datasets/README.md)",
}
IMAGE_EXTRAS = ("volume_id", "slice_index", "axis", "pixel_spacing", "slice_thickness",
                "has_liver", "has_tumor", "liver_box", "hu_offset")


def datasets_root() -> str:
    return os.path.expanduser(os.environ.get(ENV_ROOT, "datasets"))


def split_problem(json_file: str, folder: str, num_images: Optional[int]) -> Optional[str]:
    """Why a prepared split cannot be used (not prepared, or empty), or None."""
    if not os.path.exists(json_file):
        hint = BUILTIN.get(os.path.basename(folder), "python tools/prepare_data.py --source <dataset folder>")
        return f"{json_file}: prepared split not found; prepare it first: {hint}"
    if num_images == 0:
        return f"{json_file}: split has no images (too few volumes for this split?)"
    return None


def registered_split_problem(dataset_name: str) -> Optional[str]:
    """The same check from what registration knows (the manifest's image count), without
    reading the split: cheap enough to run before training starts."""
    meta = MetadataCatalog.get(dataset_name)
    if meta.get("prepared_dir") is None:  # not a liver dataset: nothing to say
        return None
    return split_problem(meta.split_json, meta.prepared_dir, meta.get("num_images"))


def load_liver_json(json_file: str, folder: str, dataset_name: Optional[str] = None, target: str = "tumor") -> list[dict]:
    """Read one split's COCO JSON into detectron2 dicts, keeping the slice extras.

    Hand-written rather than detectron2's ``load_coco_json`` because that drops the image
    extras (volume, slice index, 2.5D neighbours) the mapper and lesion metrics need.
    """
    problem = split_problem(json_file, folder, None)
    if problem:
        raise LiverD2Error(problem)
    with open(json_file) as f:
        coco = json.load(f)
    problem = split_problem(json_file, folder, len(coco["images"]))
    if problem:
        raise LiverD2Error(problem)
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append({
            "bbox": ann["bbox"],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 0,  # the one thing class: tumor
            "segmentation": ann["segmentation"],
            "iscrowd": ann.get("iscrowd", 0),
            "area": ann["area"],
        })
    if target == "liver":  # stage one of the two-stage detector: the liver region as the one box
        by_image = {img["id"]: [{"bbox": img["liver_box"], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0,
                                 "iscrowd": 0}] for img in coco["images"] if img.get("liver_box")}
    records = []
    for img in coco["images"]:
        record = {
            "file_name": os.path.join(folder, img["file_name"]),
            "height": img["height"],
            "width": img["width"],
            "image_id": img["id"],
            "annotations": by_image.get(img["id"], []),
            "context_files": [os.path.join(folder, p) for p in img["context_files"]],
        }
        record.update({k: img[k] for k in IMAGE_EXTRAS if k in img})
        records.append(record)
    return records


def register_split(name: str, folder: str, split: str, num_images: Optional[int] = None,
                   axis: Optional[str] = None, target: str = "tumor") -> str:
    """Register ``<name>_<split>`` for a prepared folder; returns the dataset name.
    ``num_images`` (from the manifest; None when not prepared yet) lets runs check early."""
    dataset_name = f"{name}_{split}" if target == "tumor" else f"{name}_{target}_{split}"
    json_file = os.path.join(folder, "annotations", f"{split}.json")
    if dataset_name in DatasetCatalog.list():
        DatasetCatalog.remove(dataset_name)
        MetadataCatalog.remove(dataset_name)
    DatasetCatalog.register(dataset_name, lambda: load_liver_json(json_file, folder, dataset_name, target))
    # the liver target has no COCO file of its own: COCOEvaluator converts its dicts
    coco_keys = {"json_file": json_file, "thing_dataset_id_to_contiguous_id": {1: 0}} if target == "tumor" else {}
    MetadataCatalog.get(dataset_name).set(
        thing_classes=[target],
        split_json=json_file,
        target=target,
        **coco_keys,
        evaluator_type="coco",
        prepared_dir=folder,
        num_images=num_images,
        axis=axis,
    )
    return dataset_name


def register_prepared(folder: str, name: Optional[str] = None) -> list[str]:
    """Register every split of one prepared folder (name from its manifest by default)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest_path):
        raise LiverD2Error(f"{folder}: no {MANIFEST}; the preparation did not finish, run it again")
    with open(manifest_path) as f:
        manifest = json.load(f)
    name = name or manifest.get("name") or os.path.basename(os.path.normpath(folder))
    axis = manifest.get("options", {}).get("axis")
    return [register_split(name, folder, split, info.get("images"), axis, target)
            for split, info in manifest["splits"].items() for target in TARGETS]


def register_all(root: Optional[str] = None) -> list[str]:
    """Built-in names plus every prepared folder found under the root."""
    root = root or datasets_root()
    names = []
    for builtin in BUILTIN:
        names += [register_split(builtin, os.path.join(root, builtin), s, target=t) for s in SPLITS for t in TARGETS]
    if os.path.isdir(root):
        for entry in sorted(os.listdir(root)):
            folder = os.path.join(root, entry)
            if os.path.exists(os.path.join(folder, MANIFEST)):
                names += register_prepared(folder, entry)
    return sorted(set(names))


register_all()


def split_scans(dataset_name: str) -> list[str]:
    """The source CT files of a registered prepared split (for whole-scan prediction on
    exactly the volumes that split evaluates)."""
    meta = MetadataCatalog.get(dataset_name)
    folder = meta.get("prepared_dir")
    if dataset_name not in DatasetCatalog.list() or folder is None:
        raise LiverD2Error(f"{dataset_name}: not a registered prepared split")
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise LiverD2Error(f"{dataset_name}: {manifest_path} not found; prepare the data first")
    with open(manifest_path) as f:
        manifest = json.load(f)
    split = os.path.basename(meta.split_json)[: -len(".json")]
    return [read_volume_record(folder, vid)["image"] for vid in manifest["splits"][split]["volumes"]]
