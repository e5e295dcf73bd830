"""DICOM series reader: real ircadb slices against their NIfTI, and synthetic series."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from liver_d2.data.dicom import DicomSeries, read_dicom_series
from liver_d2.errors import BadVolumeError

IRCADB = Path(os.environ.get("LIVER_D2_SHARED") or Path(__file__).resolve().parents[2] / "shared") / "data" / "ircadb01_17"
# LIVER_D2_SHARED, when set, names the `shared` folder (the one holding data/).


def _ircadb() -> Path:
    if not (IRCADB / "dicom_subset").is_dir() or not (IRCADB / "volume.nii.gz").is_file():
        pytest.skip(f"shared ircadb data not found at {IRCADB}")
    return IRCADB


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ircadb_series() -> tuple[DicomSeries, np.ndarray, np.ndarray]:
    nib = pytest.importorskip("nibabel")
    root = _ircadb()
    img = nib.load(str(root / "volume.nii.gz"))
    return read_dicom_series(str(root / "dicom_subset")), np.asanyarray(img.dataobj), img.affine


def test_ircadb_voxels_equal_nifti_slices(ircadb_series) -> None:
    # Found: ImagePositionPatient z rises with the file number (image_78 at z=124.8 mm,
    # image_93 at 148.8 mm, step 1.6 mm) and the NIfTI's z axis also rises (+1.6 mm per
    # slice), so position order is the NIfTI's order: hu[..., j] == nifti[..., 78 + j],
    # not reversed.
    series, nifti, _ = ircadb_series
    assert series.hu.shape == (512, 512, 16)
    assert series.hu.dtype == np.int16
    for j in range(16):
        assert np.array_equal(series.hu[..., j], nifti[..., 78 + j]), j
    assert [Path(f).name for f in series.files] == [f"image_{k}.dcm" for k in range(78, 94)]


def test_ircadb_spacing_and_affine(ircadb_series) -> None:
    series, _, nifti_affine = ircadb_series
    # Headers say PixelSpacing 0.742999970912933 and a 1.6000000238 mm position step.
    assert series.spacing == pytest.approx((0.743, 0.743, 1.6), abs=1e-6)
    # IOP is [1,0,0, 0,1,0]: columns run to patient left (+x LPS), rows to posterior
    # (+y LPS), so in RAS both in-plane axes are negative, and the slice axis is +z: the
    # same 3x3 as the NIfTI's diag(-0.743, -0.743, 1.6). Only the origin differs (the
    # NIfTI was written with a zero origin; DICOM gives slice 78's position, z=124.8).
    np.testing.assert_allclose(series.affine[:3, :3], nifti_affine[:3, :3], atol=1e-5)
    np.testing.assert_allclose(series.affine[:3, 3], [0.0, 0.0, 124.8], atol=1e-4)
    assert series.meta.get("Modality") == "CT"
    for key in ("PatientName", "PatientID", "PatientBirthDate"):
        assert key not in series.meta


def test_ircadb_copy_with_readme_and_series_uid(tmp_path: Path, ircadb_series) -> None:
    # Copies go to tmp_path only (never into the repo); a README and a DICOMDIR-like
    # non-image DICOM must be skipped.
    series, _, _ = ircadb_series
    src = _ircadb() / "dicom_subset"
    for k in range(78, 82):
        shutil.copy(src / f"image_{k}.dcm", tmp_path / f"IM{100 - k}")  # no extension, reversed names
    (tmp_path / "README").write_text("not dicom\n")
    got = read_dicom_series(str(tmp_path), series_uid=series.series_uid)
    assert np.array_equal(got.hu, series.hu[..., :4])


# ---------------------------------------------------------------- synthetic series

ROWS, COLS = 8, 6


def _write_slice(
    path: Path,
    z: float,
    stored: np.ndarray,
    series_uid: str,
    *,
    implicit: bool = False,
    instance: int = 1,
    pixel_spacing: tuple[float, float] = (0.5, 0.7),
    intercept: float = -1024,
    slope: float = 1,
    identifying: bool = True,
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.is_little_endian = True
    ds.is_implicit_VR = implicit
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Manufacturer = "Acme"
    ds.KVP = 120
    ds.ConvolutionKernel = "B30f"
    ds.SliceThickness = 2.0
    if identifying:
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "12345"
        ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20200101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-10.0, 20.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(pixel_spacing)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(str(path), write_like_original=False)


def _series(
    folder: Path, zs: list[float], seed: int = 0, prefix: str = "img", **kw
) -> tuple[str, dict[float, np.ndarray]]:
    """Write one series; file names and InstanceNumbers are in a shuffled order."""
    rng = np.random.default_rng(seed)
    uid = generate_uid()
    stored = {z: rng.integers(0, 2048, size=(ROWS, COLS), dtype=np.uint16) for z in zs}
    names = rng.permutation(len(zs))
    for i, z in enumerate(zs):
        _write_slice(folder / f"{prefix}{names[i]:03d}.dcm", z, stored[z], uid, instance=int(names[i]) + 1,
                     implicit=bool(i % 2), **kw)
    return uid, stored


def test_synthetic_order_rescale_spacing(tmp_path: Path) -> None:
    zs = [-2.5 + 2.5 * k for k in (3, 0, 5, 1, 4, 2)]  # written out of position order
    uid, stored = _series(tmp_path, zs)
    s = read_dicom_series(str(tmp_path))
    assert s.series_uid == uid
    assert s.hu.shape == (COLS, ROWS, len(zs))
    assert s.hu.dtype == np.int16
    for j, z in enumerate(sorted(zs)):
        expected = stored[z].astype(np.int32).T - 1024
        assert np.array_equal(s.hu[..., j], expected), j
    assert s.spacing == pytest.approx((0.7, 0.5, 2.5))
    # column axis -> +x LPS -> -x RAS; row axis -> +y LPS -> -y RAS; slice axis +z.
    np.testing.assert_allclose(s.affine[:3, :3], np.diag([-0.7, -0.5, 2.5]), atol=1e-9)
    np.testing.assert_allclose(s.affine[:3, 3], [10.0, -20.0, -2.5])
    # files listed in position order, not name order
    assert s.files != sorted(s.files)


def test_synthetic_equals_stack_of_transposed_slices(tmp_path: Path) -> None:
    zs = [0.0, 1.0, 2.0]
    _series(tmp_path, zs, seed=3)
    s = read_dicom_series(str(tmp_path))
    ref = np.stack([pydicom.dcmread(f).pixel_array.T.astype(np.int32) - 1024 for f in s.files], axis=-1)
    assert np.array_equal(s.hu, ref)


def test_non_integral_rescale_gives_float32(tmp_path: Path) -> None:
    _, stored = _series(tmp_path, [0.0, 2.0], slope=0.5, intercept=-1000.25)
    s = read_dicom_series(str(tmp_path))
    assert s.hu.dtype == np.float32
    np.testing.assert_allclose(s.hu[..., 0], stored[0.0].T * 0.5 - 1000.25)


def test_values_beyond_int16_give_float32(tmp_path: Path) -> None:
    uid = generate_uid()
    big = np.full((ROWS, COLS), 60000, dtype=np.uint16)
    _write_slice(tmp_path / "a.dcm", 0.0, big, uid, intercept=0)
    _write_slice(tmp_path / "b.dcm", 1.0, big, uid, intercept=0)
    s = read_dicom_series(str(tmp_path))
    assert s.hu.dtype == np.float32
    assert float(s.hu.max()) == 60000.0


def test_missing_slice(tmp_path: Path) -> None:
    _series(tmp_path, [0.0, 2.5, 5.0, 10.0, 12.5, 15.0])
    with pytest.raises(BadVolumeError) as e:
        read_dicom_series(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == f"{tmp_path}: missing slice between positions 5 and 10 mm (gap 5 mm, expected 2.5 mm)"


def test_uneven_gap(tmp_path: Path) -> None:
    _series(tmp_path, [0.0, 2.5, 5.0, 8.5, 11.0, 13.5])
    with pytest.raises(BadVolumeError, match="uneven slice spacing between positions 5 and 8.5 mm"):
        read_dicom_series(str(tmp_path))


def test_small_gap_jitter_is_tolerated(tmp_path: Path) -> None:
    _series(tmp_path, [0.0, 2.5, 5.005, 7.5, 10.0])
    assert read_dicom_series(str(tmp_path)).spacing[2] == pytest.approx(2.5, abs=0.01)


def test_duplicate_position(tmp_path: Path) -> None:
    uid, _ = _series(tmp_path, [0.0, 2.5, 5.0])
    _write_slice(tmp_path / "dup.dcm", 2.5, np.zeros((ROWS, COLS), np.uint16), uid)
    with pytest.raises(BadVolumeError, match="duplicate slice position 2.5 mm"):
        read_dicom_series(str(tmp_path))


@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_truncated_file(tmp_path: Path, fraction: float) -> None:
    # 0.5 cuts inside the header (pydicom would silently return a partial dataset);
    # 0.95 cuts inside the pixel data.
    _series(tmp_path, [0.0, 2.5, 5.0, 7.5])
    victim = sorted(tmp_path.iterdir())[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(BadVolumeError) as e:
        read_dicom_series(str(tmp_path))
    assert str(victim) in str(e.value)
    assert "truncated" in str(e.value)
    assert "\n" not in str(e.value)


def test_dcm_file_cut_before_dicm_prefix(tmp_path: Path) -> None:
    _series(tmp_path, [0.0, 2.5])
    victim = sorted(tmp_path.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(BadVolumeError, match=str(victim.name)):
        read_dicom_series(str(tmp_path))


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(BadVolumeError) as e:
        read_dicom_series(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: no DICOM images"


def test_folder_with_only_non_dicom(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("hello")
    (tmp_path / "notes.txt").write_bytes(os.urandom(300))
    with pytest.raises(BadVolumeError, match="no DICOM images"):
        read_dicom_series(str(tmp_path))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BadVolumeError, match="does not exist"):
        read_dicom_series(str(tmp_path / "nope"))


def test_two_series(tmp_path: Path) -> None:
    uid_a, stored_a = _series(tmp_path, [0.0, 2.5, 5.0], seed=1, prefix="a")
    uid_b, _ = _series(tmp_path, [0.0, 1.0], seed=2, prefix="b")
    with pytest.raises(BadVolumeError) as e:
        read_dicom_series(str(tmp_path))
    msg = str(e.value)
    assert f"{uid_a} (3 slices)" in msg and f"{uid_b} (2 slices)" in msg
    assert "series_uid" in msg and "\n" not in msg
    s = read_dicom_series(str(tmp_path), series_uid=uid_a)
    assert s.hu.shape == (COLS, ROWS, 3)
    assert np.array_equal(s.hu[..., 0], stored_a[0.0].T.astype(np.int32) - 1024)
    assert read_dicom_series(str(tmp_path), series_uid=uid_b).spacing[2] == pytest.approx(1.0)
    with pytest.raises(BadVolumeError, match="no DICOM series with SeriesInstanceUID 1.2.3"):
        read_dicom_series(str(tmp_path), series_uid="1.2.3")


def test_non_dicom_files_ignored(tmp_path: Path) -> None:
    _, stored = _series(tmp_path, [0.0, 2.5, 5.0])
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 50)  # not parseable without DICM: skipped
    (tmp_path / "README").write_text("scan of a phantom\n")
    (tmp_path / "thumbs.db").write_bytes(os.urandom(1000))
    (tmp_path / "sub").mkdir()
    _write_slice(tmp_path / "sub" / "other.dcm", 99.0, stored[0.0], generate_uid())  # subfolders not read
    # DICOM files without an image are skipped too: a real DICOMDIR (written by pydicom's
    # FileSet elsewhere, then moved in) and a text report.
    fs = FileSet()
    fs.add(str(sorted(tmp_path.glob("*.dcm"))[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pydicom's own DicomDir note
        fs.write(str(tmp_path / "fileset"))
    shutil.move(str(tmp_path / "fileset" / "DICOMDIR"), str(tmp_path / "DICOMDIR2"))
    shutil.rmtree(tmp_path / "fileset")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(str(tmp_path / "report.dcm"), write_like_original=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = read_dicom_series(str(tmp_path))
    assert s.hu.shape == (COLS, ROWS, 3)
    assert all(Path(f).suffix == ".dcm" for f in s.files)


def test_meta_has_no_identifying_fields(tmp_path: Path) -> None:
    _series(tmp_path, [0.0, 2.5], identifying=True)
    s = read_dicom_series(str(tmp_path))
    for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate"):
        assert key not in s.meta
    assert s.meta == {"Modality": "CT", "Manufacturer": "Acme", "SliceThickness": 2.0, "KVP": 120.0,
                      "ConvolutionKernel": "B30f"}
    assert "Doe" not in repr(s.meta) and "12345" not in repr(s.meta)


def test_single_slice_spacing_fallback(tmp_path: Path) -> None:
    _series(tmp_path, [7.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = read_dicom_series(str(tmp_path))
    assert s.hu.shape == (COLS, ROWS, 1)
    assert s.spacing == pytest.approx((0.7, 0.5, 2.0))  # SliceThickness
    np.testing.assert_allclose(s.affine[:3, 2], [0.0, 0.0, 2.0])


def test_inconsistent_pixel_spacing(tmp_path: Path) -> None:
    uid, _ = _series(tmp_path, [0.0, 2.5])
    _write_slice(tmp_path / "z.dcm", 5.0, np.zeros((ROWS, COLS), np.uint16), uid, pixel_spacing=(0.6, 0.7))
    with pytest.raises(BadVolumeError, match="PixelSpacing differs"):
        read_dicom_series(str(tmp_path))


def test_inconsistent_size(tmp_path: Path) -> None:
    uid, _ = _series(tmp_path, [0.0, 2.5])
    _write_slice(tmp_path / "z.dcm", 5.0, np.zeros((ROWS + 1, COLS), np.uint16), uid)
    with pytest.raises(BadVolumeError, match="9x6 pixels"):
        read_dicom_series(str(tmp_path))


def test_order_along_oblique_normal(tmp_path: Path) -> None:
    # Slices stacked along -z with a flipped column direction: normal = x cross (-y) = -z,
    # so position order is descending z and the slice axis still points along the normal.
    rng = np.random.default_rng(5)
    uid = generate_uid()
    zs = [0.0, -3.0, -6.0]
    for i, z in enumerate([-3.0, 0.0, -6.0]):
        stored = rng.integers(0, 100, size=(ROWS, COLS), dtype=np.uint16)
        _write_slice(tmp_path / f"s{i}.dcm", z, stored, uid)
    for p in tmp_path.iterdir():
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        ds.save_as(str(p))
    s = read_dicom_series(str(tmp_path))
    got_z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in s.files]
    assert got_z == zs
    assert s.spacing[2] == pytest.approx(3.0)
    np.testing.assert_allclose(s.affine[:3, 2], [0.0, 0.0, -3.0])
    np.testing.assert_allclose(s.affine[:3, 1], [0.0, 0.5, 0.0])  # -y LPS -> +y RAS
