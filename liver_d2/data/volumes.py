"""The one volume reader: every scan and label enters the project through here.

Training preparation, prediction and evaluation all call :func:`read_volume` /
:func:`read_case`, so orientation, HU and spacing handling can never differ between them.

Canonical orientation is LPS index order (DICOM/ITK patient axes): array axis 0 runs
toward the patient's Left, axis 1 toward Posterior, axis 2 toward Superior. Then
``hu[:, :, k].T`` is an axial slice as a radiologist reads it (anterior at the top,
patient's right on the image's left), and a DICOM series needs no flips at all.
"""
from __future__ import annotations

import glob
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Optional

import nibabel as nib
import numpy as np
from nibabel import orientations

from liver_d2.errors import BadVolumeError

CANONICAL_AXCODES = ("L", "P", "S")
LABEL_VALUES = (0, 1, 2)  # MSD Task03 / LiTS: background, liver, tumor
NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class Volume:
    """A CT scan (and optionally its label map) on one canonical LPS grid."""

    volume_id: str
    hu: np.ndarray  # (x, y, z) in LPS index order; int16 when the data is integral
    spacing: tuple[float, float, float]  # mm along array axes 0, 1, 2
    affine: np.ndarray  # 4x4 RAS (NIfTI convention) affine of ``hu`` as stored here
    source: str  # path of the image file or DICOM folder
    label: Optional[np.ndarray] = None  # uint8, same shape, values in LABEL_VALUES
    label_source: Optional[str] = None
    meta: dict = field(default_factory=dict)
    source_affine: Optional[np.ndarray] = None  # affine of the file as read, before reorientation

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class Case:
    """One image/label pair found in a dataset root (nothing read yet)."""

    volume_id: str
    image: str
    label: Optional[str]


# ---------------------------------------------------------------------------- reading


def _load_nifti(path: str) -> nib.Nifti1Image:
    """Open a NIfTI file and force its data to load, so corruption is found here."""
    if not os.path.exists(path):
        raise BadVolumeError(f"{path}: file not found")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise BadVolumeError(f"{path}: corrupt or truncated NIfTI ({type(e).__name__}: {e})") from None
    if data.size == 0:
        raise BadVolumeError(f"{path}: empty volume (shape {tuple(img.shape)}, no voxels)")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadVolumeError(f"{path}: expected a 3D volume, got {data.ndim}D with shape {data.shape}")
    return nib.Nifti1Image(data, img.affine, img.header)


def _integral_hu(data: np.ndarray, path: str) -> np.ndarray:
    """HU exactly as stored: int16 where every value is integral and in range, else float32."""
    if not np.issubdtype(data.dtype, np.number):
        raise BadVolumeError(f"{path}: voxel type {data.dtype} is not numeric")
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise BadVolumeError(f"{path}: {bad} NaN or Inf voxels")
        if np.array_equal(data, np.round(data)) and data.min() >= -32768 and data.max() <= 32767:
            return data.astype(np.int16)
        return data.astype(np.float32)
    if data.min() < -32768 or data.max() > 32767:
        raise BadVolumeError(f"{path}: values {data.min()}..{data.max()} do not fit CT HU (int16)")
    return data.astype(np.int16)


def from_canonical(data: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical`: an LPS-ordered array back on the grid of the file it came
    from (whose affine was ``source_affine``), e.g. to write outputs that overlay the input."""
    current = orientations.axcodes2ornt(CANONICAL_AXCODES)
    target = orientations.io_orientation(source_affine)
    return orientations.apply_orientation(data, orientations.ornt_transform(current, target))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip array axes to LPS index order; returns the array and its new affine."""
    current = orientations.io_orientation(affine)
    target = orientations.axcodes2ornt(CANONICAL_AXCODES)
    transform = orientations.ornt_transform(current, target)
    out = orientations.apply_orientation(data, transform)  # a view: flips and transposes only
    new_affine = affine @ orientations.inv_ornt_aff(transform, data.shape)
    return out, new_affine


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def read_image(path: str) -> Volume:
    """Read a CT scan (NIfTI file or DICOM series folder) into canonical orientation."""
    if os.path.isdir(path):
        from liver_d2.data.dicom import read_dicom_series  # pydicom only when needed

        series = read_dicom_series(path)
        data, affine, meta = series.hu, series.affine, dict(series.meta)
    else:
        img = _load_nifti(path)
        data, affine, meta = np.asanyarray(img.dataobj), img.affine, {}
    hu = _integral_hu(np.asarray(data), path)
    if hu.size == 0:
        raise BadVolumeError(f"{path}: empty volume (shape {hu.shape})")
    source_affine = np.asarray(affine, dtype=np.float64)
    hu, affine = to_canonical(hu, source_affine)
    return Volume(volume_id=volume_id_from_path(path), hu=hu, spacing=_spacing(affine),
                  affine=affine, source=path, meta=meta, source_affine=source_affine)


def read_label(path: str, like: Volume) -> np.ndarray:
    """Read a 0/1/2 label map and check it lies on the same grid as ``like``."""
    img = _load_nifti(path)
    data = np.asanyarray(img.dataobj)
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise BadVolumeError(f"{path}: NaN or Inf in label map")
        if not np.array_equal(data, np.round(data)):
            raise BadVolumeError(f"{path}: label map has non-integer values")
    lo, hi = data.min(), data.max()  # cheap range check first: np.unique sorts the volume
    extra = [] if lo >= 0 and hi <= max(LABEL_VALUES) else \
        sorted(set(np.unique(data).tolist()) - set(LABEL_VALUES))
    if extra:
        raise BadVolumeError(
            f"{path}: label values {extra[:5]} outside {{0 background, 1 liver, 2 tumor}}"
        )
    label, affine = to_canonical(data.astype(np.uint8), img.affine)
    if label.shape != like.hu.shape:
        raise BadVolumeError(f"{path}: label shape {label.shape} differs from image shape {like.hu.shape}"
                             f" ({like.source})")
    if not np.allclose(affine, like.affine, atol=AFFINE_TOLERANCE_MM):
        raise BadVolumeError(f"{path}: label affine differs from the image's ({like.source});"
                             f" max difference {np.abs(affine - like.affine).max():.4g} mm")
    return label


def read_case(case: Case) -> Volume:
    """Read an image and its label (when there is one) as one checked Volume."""
    volume = read_image(case.image)
    volume.volume_id = case.volume_id
    if case.label is not None:
        volume.label = read_label(case.label, like=volume)
        volume.label_source = case.label
    return volume


# ---------------------------------------------------------------------- dataset layouts


def volume_id_from_path(path: str) -> str:
    """``.../liver_12.nii.gz`` → ``liver_12``; a DICOM folder → its folder name."""
    name = os.path.basename(os.path.normpath(path))
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _numeric_key(path: str) -> tuple:
    """Sort ``liver_2`` before ``liver_10`` (natural order, as MSD and LiTS number cases)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path)))


def _nifti_files(folder: str) -> list[str]:
    files = [p for p in glob.glob(os.path.join(folder, "*")) if p.endswith(NIFTI_SUFFIXES)]
    # MSD archives carry macOS "._liver_1.nii.gz" resource forks: never volumes.
    return sorted((p for p in files if not os.path.basename(p).startswith("._")), key=_numeric_key)


def _find_msd(root: str) -> Optional[list[Case]]:
    images_dir = os.path.join(root, "imagesTr")
    if not os.path.isdir(images_dir):
        return None
    listed = os.path.join(root, "dataset.json")
    labels_dir = os.path.join(root, "labelsTr")
    if os.path.exists(listed):
        try:
            with open(listed) as f:
                entries = json.load(f).get("training", [])
        except (json.JSONDecodeError, OSError, AttributeError) as e:
            raise BadVolumeError(f"{listed}: unreadable dataset.json ({e})") from None
        images = sorted((os.path.normpath(os.path.join(root, e["image"])) for e in entries), key=_numeric_key)
        if not images:
            images = _nifti_files(images_dir)
    else:
        images = _nifti_files(images_dir)
    cases = []
    for image in images:
        label = os.path.join(labels_dir, os.path.basename(image))
        cases.append(Case(volume_id_from_path(image), image, label))
    return cases


def _find_lits(root: str) -> Optional[list[Case]]:
    pattern = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
    images = [p for p in glob.glob(os.path.join(root, "**", "volume-*.nii*"), recursive=True)
              if pattern.match(os.path.basename(p))]
    if not images:
        return None
    cases = []
    for image in sorted(images, key=_numeric_key):
        number = pattern.match(os.path.basename(image)).group(1)  # type: ignore[union-attr]
        folder = os.path.dirname(image)
        candidates = [os.path.join(folder, f"segmentation-{number}{s}") for s in NIFTI_SUFFIXES]
        found = next((c for c in candidates if os.path.exists(c)), None)
        if found is None:  # LiTS batches sometimes keep segmentations in a sibling folder
            found = next(iter(glob.glob(os.path.join(root, "**", f"segmentation-{number}.nii*"),
                                        recursive=True)), candidates[0])
        cases.append(Case(f"volume-{number}", image, found))
    return cases


def find_cases(root: str) -> list[Case]:
    """Recognise the MSD (imagesTr/labelsTr) or LiTS (volume-N/segmentation-N) layout."""
    if not os.path.isdir(root):
        raise BadVolumeError(f"{root}: dataset folder not found")
    for finder in (_find_msd, _find_lits):
        cases = finder(root)
        if cases is not None:
            if not cases:
                raise BadVolumeError(f"{root}: no volumes found")
            return cases
    raise BadVolumeError(
        f"{root}: no MSD (imagesTr/, labelsTr/, dataset.json) or LiTS (volume-N.nii,"
        " segmentation-N.nii) volumes found"
    )


def check_label_present(case: Case) -> None:
    """A missing label is a per-case error, found before any volume is read."""
    if case.label is None or not os.path.exists(case.label):
        raise BadVolumeError(f"{case.image}: missing label file {case.label}")

