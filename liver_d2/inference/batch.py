"""Prediction over many scans: find them, run each, write its files, and keep going past
a bad one (reported in one line) so a folder run always finishes."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pandas as pd
from tqdm import tqdm

from liver_d2.data.dicom import DICOM_EXTENSIONS
from liver_d2.data.volumes import NIFTI_SUFFIXES, volume_id_from_path
from liver_d2.errors import LiverD2Error
from liver_d2.inference import writers
from liver_d2.inference.predictor import VolumePrediction

DICM_OFFSET = 128  # DICOM Part 10 files carry "DICM" after a 128-byte preamble


def _is_dicom_file(path: str) -> bool:
    if path.lower().endswith(DICOM_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(DICM_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(folder: str) -> bool:
    """A folder holding DICOM files directly (a series), as opposed to a folder of scans."""
    with os.scandir(folder) as it:
        return any(e.is_file() and _is_dicom_file(e.path) for e in it)


def find_scans(paths: Sequence[str]) -> list[str]:
    """NIfTI files and DICOM series folders named by ``paths``, or found one level inside a
    folder of them. A path that does not exist is kept, so it is reported, not dropped."""
    scans: list[str] = []
    for path in paths:
        if not os.path.isdir(path) or is_dicom_folder(path):
            scans.append(path)
            continue
        for entry in sorted(os.listdir(path)):
            full = os.path.join(path, entry)
            if entry.endswith(NIFTI_SUFFIXES) or (os.path.isdir(full) and is_dicom_folder(full)):
                scans.append(full)
    return scans


def liver_mask_for(scan: str, liver_masks: Optional[str], single: bool) -> Optional[str]:
    """The label map restricting a scan to liver slices: ``liver_masks`` itself when it is a
    file and one scan runs, else ``<liver_masks>/<volume id>.nii(.gz)`` when it exists."""
    if not liver_masks:
        return None
    if os.path.isfile(liver_masks):
        if not single:
            raise LiverD2Error(f"--liver-masks {liver_masks} is one file but several scans run; give a folder of "
                               "<volume id>.nii.gz label maps")
        return liver_masks
    vid = volume_id_from_path(scan)
    for suffix in NIFTI_SUFFIXES:
        candidate = os.path.join(liver_masks, vid + suffix)
        if os.path.isfile(candidate):
            return candidate
    return None


@dataclass
class BatchOptions:
    min_score: float = 0.3  # lesions below this are left out of CSV, NIfTI and PNG (not JSON)
    overlays: int = 6  # top findings drawn per volume (0 = no PNG)
    nifti: bool = False
    include_patient_fields: bool = False
    liver_masks: Optional[str] = None


@dataclass
class BatchResult:
    volumes: list[dict] = field(default_factory=list)  # per finished scan: id, lesions, seconds
    failures: list[str] = field(default_factory=list)
    lesions_csv: str = ""


def predict_scans(predictor: Callable[..., VolumePrediction], scans: Sequence[str], out_dir: str,
                  options: Optional[BatchOptions] = None) -> BatchResult:
    """Predict every scan; per scan write ``<id>.json`` (all lesions), then optionally
    ``<id>_boxes.nii.gz`` and PNGs under ``overlays/``; finally ``lesions.csv`` for the run."""
    options = options or BatchOptions()
    os.makedirs(out_dir, exist_ok=True)
    result = BatchResult()
    rows: list[dict] = []
    for scan in tqdm(scans, desc="volumes", unit="vol"):
        try:
            mask = liver_mask_for(scan, options.liver_masks, single=len(scans) == 1)
            prediction = predictor(scan, liver_mask=mask)
            vid = prediction.volume.volume_id
            writers.write_json(prediction, os.path.join(out_dir, f"{vid}.json"), options.include_patient_fields)
            if options.nifti:
                writers.write_box_nifti(prediction, os.path.join(out_dir, f"{vid}_boxes.nii.gz"), options.min_score)
            if options.overlays > 0:
                writers.write_overlays(prediction, os.path.join(out_dir, "overlays"), options.overlays, options.min_score)
        except LiverD2Error as e:
            result.failures.append(str(e))
            tqdm.write(f"skipped: {e}")
            continue
        found = writers.lesion_rows(prediction, options.min_score)
        rows.extend(found)
        result.volumes.append({"volume_id": vid, "slices": prediction.slices_run, "lesions": len(found),
                               "seconds": round(prediction.seconds, 2)})
    result.lesions_csv = os.path.join(out_dir, "lesions.csv")
    pd.DataFrame(rows, columns=writers.CSV_COLUMNS).to_csv(result.lesions_csv, index=False)
    return result
