"""Read one CT series from a folder of single-frame DICOM files into a HU volume.

The result uses the same conventions as the NIfTI loader: array axes (column, row, slice)
and a RAS ("NIfTI") affine, so a DICOM folder and the NIfTI made from it give the same
array and affine. Slices are ordered by their position along the slice normal, never by
InstanceNumber or file name (both are unreliable after anonymisation or re-export).

Every bad input raises :class:`BadVolumeError` with one line naming the file or folder,
so command-line tools can report it without a stack trace.
"""
from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from liver_d2.errors import BadVolumeError

# Files with these extensions are expected to be DICOM: if one has no DICM prefix it is
# reported (most often a file truncated to almost nothing) instead of silently skipped.
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic", ".ima")

# Header fields copied to DicomSeries.meta: acquisition facts only, nothing that could
# identify the patient (no names, IDs, dates, institution or free-text descriptions).
META_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "SliceThickness",
    "SpacingBetweenSlices",
    "KVP",
    "ConvolutionKernel",
)

# Slice gaps may differ from the median by this much before the series counts as uneven.
GAP_REL_TOL = 0.01
GAP_ABS_TOL_MM = 0.01
# Two slices closer than this along the normal are the same position.
DUPLICATE_TOL_MM = 0.01
# Slices of one series must agree on orientation cosines / pixel spacing this closely.
IOP_TOL = 1e-4
PIXEL_SPACING_REL_TOL = 1e-4

_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}


@dataclass
class DicomSeries:
    """One series as a volume.

    ``hu`` has axes (column, row, slice); ``hu[..., k]`` is the k-th slice in position
    order, transposed (``pixel_array.T``). It is int16 when every rescaled value is an
    integer within int16, otherwise float32. ``affine`` maps (column, row, slice, 1) to
    RAS millimetres; ``spacing`` is (column, row, slice) spacing in mm.
    """

    hu: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    files: list[str]
    series_uid: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Header:
    """What the cheap header-only pass keeps of one image file."""

    path: str
    ds: Dataset
    series_uid: str


def _fmt(x: float) -> str:
    """Millimetres for messages: 3 decimals, trailing zeros dropped."""
    s = f"{x:.3f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _sop_class(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds.file_meta, "MediaStorageSOPClassUID", None) or ""
    return str(uid)


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    """Size of uncompressed pixel data from the header, or None when it cannot be known."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return (rows * cols * spp * frames * bits + 7) // 8


def _read_header(path: str) -> _Header | None:
    """Header of ``path`` without pixels; None for non-DICOM or non-image files.

    pydicom silently returns a partial dataset for a file cut short, so truncation is
    detected here: an image file must stop at its pixel data element, and (when
    uncompressed) enough bytes must follow it.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fp:
            try:
                with warnings.catch_warnings():
                    # a DICOMDIR in the folder is skipped below; pydicom's notes about it are noise
                    warnings.filterwarnings("ignore", message=".*DicomDir.*", category=DeprecationWarning)
                    warnings.filterwarnings("ignore", message=".*Media Storage Directory Storage.*")
                    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
            except InvalidDicomError:
                if path.lower().endswith(DICOM_EXTENSIONS):
                    raise BadVolumeError(
                        f"{path}: not a valid DICOM file (no DICM prefix; truncated or corrupt?)"
                    ) from None
                return None
            pos = fp.tell()
            fp.seek(pos)
            next_tag = fp.read(4)
    except BadVolumeError:
        raise
    except OSError as e:
        raise BadVolumeError(f"{path}: cannot read file ({e.strerror or e})") from None
    except Exception as e:  # pydicom raises many types on a damaged header
        raise BadVolumeError(f"{path}: corrupt or truncated DICOM header ({type(e).__name__}: {e})") from None

    ts = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if ts is None:
        raise BadVolumeError(f"{path}: corrupt or truncated DICOM file meta (no TransferSyntaxUID)")
    sop = _sop_class(ds)
    if "Rows" not in ds and "Image Storage" not in UID(sop).name:
        return None  # DICOMDIR, structured report, RT structure set ... : not an image
    if UID(ts).is_deflated:
        pass  # fp position is inside the inflated stream; the pixel read will check
    else:
        fmt = "<HH" if UID(ts).is_little_endian else ">HH"
        if len(next_tag) < 4 or struct.unpack(fmt, next_tag) not in _PIXEL_TAGS:
            raise BadVolumeError(f"{path}: truncated DICOM image (file ends before the pixel data)")
        expected = None if UID(ts).is_compressed else _expected_pixel_bytes(ds)
        element_header = 8 if UID(ts).is_implicit_VR else 12  # tag, (VR, reserved,) length
        available = size - pos - element_header
        if expected is not None and available < expected:
            raise BadVolumeError(
                f"{path}: truncated DICOM image (pixel data cut short: {max(available, 0)} of {expected} bytes)"
            )
    return _Header(path=path, ds=ds, series_uid=str(ds.get("SeriesInstanceUID", "") or ""))


def _floats(ds: Dataset, keyword: str, n: int, path: str) -> np.ndarray:
    """A required multi-valued numeric attribute as floats, or a one-line error."""
    value = ds.get(keyword)
    if value is None:
        raise BadVolumeError(f"{path}: missing {keyword}")
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise BadVolumeError(f"{path}: unreadable {keyword} {value!r}") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise BadVolumeError(f"{path}: {keyword} must be {n} finite numbers, got {value!r}")
    return arr


def _rescale(ds: Dataset, path: str) -> tuple[float, float]:
    """(slope, intercept) with the DICOM defaults 1 and 0."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    try:
        slope = 1.0 if slope in (None, "") else float(slope)
        intercept = 0.0 if intercept in (None, "") else float(intercept)
    except (TypeError, ValueError):
        raise BadVolumeError(f"{path}: unreadable RescaleSlope/RescaleIntercept") from None
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise BadVolumeError(f"{path}: non-finite RescaleSlope/RescaleIntercept")
    return slope, intercept


def _meta(ds: Dataset) -> dict[str, Any]:
    """Whitelisted, non-identifying header fields as plain Python values."""
    out: dict[str, Any] = {}
    for key in META_KEYWORDS:
        value = ds.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, pydicom.multival.MultiValue):
            out[key] = [_plain(v) for v in value]
        else:
            out[key] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (pydicom.valuerep.DSfloat, pydicom.valuerep.DSdecimal, float)):
        return float(value)
    if isinstance(value, (pydicom.valuerep.IS, int)):
        return int(value)
    return str(value)


def _list_files(folder: str) -> list[str]:
    if not os.path.exists(folder):
        raise BadVolumeError(f"{folder}: folder does not exist")
    if not os.path.isdir(folder):
        raise BadVolumeError(f"{folder}: not a folder")
    try:
        with os.scandir(folder) as it:
            return sorted(e.path for e in it if e.is_file())
    except OSError as e:
        raise BadVolumeError(f"{folder}: cannot list folder ({e.strerror or e})") from None


def _select_series(folder: str, headers: list[_Header], series_uid: str | None) -> tuple[str, list[_Header]]:
    by_uid: dict[str, list[_Header]] = {}
    for h in headers:
        by_uid.setdefault(h.series_uid, []).append(h)
    listing = ", ".join(f"{uid or '(no SeriesInstanceUID)'} ({len(hs)} slices)" for uid, hs in sorted(by_uid.items()))
    if series_uid is None:
        if len(by_uid) > 1:
            raise BadVolumeError(
                f"{folder}: {len(by_uid)} DICOM series found: {listing}; pass series_uid to choose one"
            )
        (uid, chosen), = by_uid.items()
        return uid, chosen
    if series_uid not in by_uid:
        raise BadVolumeError(f"{folder}: no DICOM series with SeriesInstanceUID {series_uid}; found {listing}")
    return series_uid, by_uid[series_uid]


def _check_gaps(folder: str, z: np.ndarray, files: list[str]) -> float:
    """Median slice gap along the normal; raises on duplicates, missing or uneven slices."""
    gaps = np.diff(z)
    for i, g in enumerate(gaps):
        if g < DUPLICATE_TOL_MM:
            raise BadVolumeError(
                f"{folder}: duplicate slice position {_fmt(z[i])} mm in {os.path.basename(files[i])} "
                f"and {os.path.basename(files[i + 1])}"
            )
    s = float(np.median(gaps))
    tol = GAP_REL_TOL * s + GAP_ABS_TOL_MM
    for i, g in enumerate(gaps):
        if abs(g - s) <= tol:
            continue
        k = int(round(g / s))
        where = f"between positions {_fmt(z[i])} and {_fmt(z[i + 1])} mm (gap {_fmt(g)} mm, expected {_fmt(s)} mm)"
        if k >= 2 and abs(g - k * s) <= k * tol:
            what = "missing slice" if k == 2 else f"missing {k - 1} slices"
            raise BadVolumeError(f"{folder}: {what} {where}")
        raise BadVolumeError(f"{folder}: uneven slice spacing {where}")
    return s


def _fallback_slice_spacing(ds: Dataset) -> float:
    """Slice spacing of a one-slice series: SpacingBetweenSlices, SliceThickness or 1 mm."""
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            v = float(ds.get(key) or 0)
        except (TypeError, ValueError):
            continue
        if np.isfinite(v) and v > 0:
            return v
    return 1.0


def _pixels(path: str) -> np.ndarray:
    """Stored pixel values of one file (full read), or a one-line error naming it."""
    try:
        ds = pydicom.dcmread(path, force=False)
        arr = ds.pixel_array
    except Exception as e:  # truncated data, missing decoder plugin, corrupt codestream ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadVolumeError(f"{path}: cannot decode pixel data ({msg})") from None
    return arr


def read_dicom_series(folder: str, series_uid: str | None = None) -> DicomSeries:
    """Read the (single, or chosen) image series in ``folder`` as a HU volume.

    Headers are read first without pixels to find, select and order the slices cheaply;
    only the chosen series' pixel data are then decoded. Non-DICOM files and DICOM files
    without an image (DICOMDIR, reports) are skipped; subfolders are not searched. A
    damaged DICOM file anywhere in the folder is an error, since its series is unknown.
    With a gantry tilt the affine follows the real slice positions (sheared), while
    ``spacing[2]`` is the distance between slices along the normal.
    """
    folder = os.fspath(folder)
    headers = [h for h in (_read_header(p) for p in _list_files(folder)) if h is not None]
    if not headers:
        raise BadVolumeError(f"{folder}: no DICOM images")
    uid, chosen = _select_series(folder, headers, series_uid)

    for h in chosen:
        for key in ("Rows", "Columns"):
            if not isinstance(h.ds.get(key), int) or h.ds.get(key) <= 0:
                raise BadVolumeError(f"{h.path}: missing or invalid {key}")
    first = chosen[0]
    iop0 = _floats(first.ds, "ImageOrientationPatient", 6, first.path)
    ps0 = _floats(first.ds, "PixelSpacing", 2, first.path)
    shape0 = (int(first.ds.Rows), int(first.ds.Columns))
    for h in chosen:
        ds = h.ds
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise BadVolumeError(f"{h.path}: multi-frame DICOM images are not supported")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise BadVolumeError(f"{h.path}: colour DICOM images are not supported")
        if (int(ds.Rows), int(ds.Columns)) != shape0:
            raise BadVolumeError(
                f"{h.path}: {int(ds.Rows)}x{int(ds.Columns)} pixels, but {first.path} has {shape0[0]}x{shape0[1]}"
            )
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, h.path), iop0, rtol=0, atol=IOP_TOL):
            raise BadVolumeError(f"{h.path}: ImageOrientationPatient differs from {first.path}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, h.path), ps0, rtol=PIXEL_SPACING_REL_TOL, atol=0):
            raise BadVolumeError(f"{h.path}: PixelSpacing differs from {first.path}")
    if np.any(ps0 <= 0):
        raise BadVolumeError(f"{first.path}: PixelSpacing must be positive, got {list(ps0)}")

    row_dir, col_dir = iop0[:3], iop0[3:]  # direction of increasing column index, of increasing row index
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise BadVolumeError(f"{first.path}: ImageOrientationPatient is not two orthonormal vectors")
    positions = np.stack([_floats(h.ds, "ImagePositionPatient", 3, h.path) for h in chosen])
    z = positions @ normal
    order = np.argsort(z, kind="stable")
    chosen = [chosen[i] for i in order]
    positions, z = positions[order], z[order]
    files = [h.path for h in chosen]

    if len(chosen) > 1:
        slice_spacing = _check_gaps(folder, z, files)
        step = (positions[-1] - positions[0]) / (len(chosen) - 1)
    else:
        slice_spacing = _fallback_slice_spacing(chosen[0].ds)
        step = normal * slice_spacing

    # PixelSpacing is (row spacing, column spacing): [0] is the distance between rows,
    # i.e. the step along a column, which is array axis 1 here.
    row_spacing, col_spacing = float(ps0[0]), float(ps0[1])
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    hu = _read_pixels(chosen, shape0)
    return DicomSeries(
        hu=hu,
        affine=affine,
        spacing=(col_spacing, row_spacing, float(slice_spacing)),
        files=files,
        series_uid=uid,
        meta=_meta(chosen[0].ds),
    )


def _read_pixels(chosen: list[_Header], shape: tuple[int, int]) -> np.ndarray:
    """Decode and rescale the slices into a (column, row, slice) array.

    Filled slice-major (contiguous writes) and returned as a transposed, Fortran-ordered
    view: the same values and shape as ``np.stack([p.T ...], axis=-1)`` without the copy.
    """
    rescale = [_rescale(h.ds, h.path) for h in chosen]
    integral = all(float(s).is_integer() and float(b).is_integer() for s, b in rescale)
    n = len(chosen)
    info16 = np.iinfo(np.int16)
    out = np.empty((n, *shape), dtype=np.int16 if integral else np.float32)
    for i, (h, (slope, intercept)) in enumerate(zip(chosen, rescale)):
        p = _pixels(h.path)
        if p.shape != shape:
            raise BadVolumeError(f"{h.path}: pixel data shape {p.shape} does not match Rows x Columns {shape}")
        if out.dtype == np.int16:
            if slope == 1:
                v = p.astype(np.int32)
                v += int(intercept)
            else:
                v = p.astype(np.int64) * int(slope) + int(intercept)
            if v.size and (v.min() < info16.min or v.max() > info16.max):
                out = out.astype(np.float32)  # values beyond int16: keep them exactly in float32
                out[i] = v
            else:
                out[i] = v
        else:
            out[i] = p.astype(np.float64) * slope + intercept
    return out.transpose(2, 1, 0)


# Identifying fields: never copied into outputs unless a user asks (predict.py
# --include-patient-fields), since findings files travel further than the scans do.
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate")


def patient_fields(folder: str) -> dict[str, str]:
    """Name, ID and birth date from the first readable DICOM header in ``folder``."""
    for path in _list_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError):
            continue
        return {key: str(ds.get(key, "")) for key in PATIENT_KEYWORDS}
    return {}
