"""The one volume reader: orientation, exact HU, layouts and every bad input."""
from __future__ import annotations

import json
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import LPS_AFFINE, save_nifti, tiny_case, write_msd
from liver_d2.data.volumes import Case, find_cases, read_case, read_image
from liver_d2.errors import BadVolumeError


def ras_copy(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored in RAS index order: flip x and y, move the origin to match."""
    flipped = data[::-1, ::-1, :].copy()
    new = affine.copy()
    for axis in (0, 1):
        new[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
        new[:3, axis] *= -1
    return flipped, new


def test_lps_and_ras_copies_read_identically(tmp_path: Path) -> None:
    hu, label = tiny_case()
    affine = LPS_AFFINE.copy()
    affine[:3, 3] = [10.0, -20.0, 30.0]
    save_nifti(tmp_path / "lps.nii.gz", hu, affine)
    ras_hu, ras_affine = ras_copy(hu, affine)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    save_nifti(tmp_path / "ras.nii.gz", ras_hu, ras_affine)
    # and a third copy with the axes permuted (slices first), as some converters write
    perm_affine = ras_affine[:, [2, 0, 1, 3]]
    save_nifti(tmp_path / "perm.nii.gz", np.ascontiguousarray(ras_hu.transpose(2, 0, 1)), perm_affine)
    a, b, c = (read_image(str(tmp_path / f"{n}.nii.gz")) for n in ("lps", "ras", "perm"))
    np.testing.assert_array_equal(a.hu, hu)
    np.testing.assert_array_equal(b.hu, a.hu)
    np.testing.assert_array_equal(c.hu, a.hu)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)
    np.testing.assert_allclose(c.affine, a.affine, atol=1e-5)
    assert nib.aff2axcodes(a.affine) == ("L", "P", "S")
    assert c.spacing == pytest.approx((0.8, 0.8, 2.5))


def test_hu_kept_exactly_as_int16(tmp_path: Path) -> None:
    hu = np.arange(-1024, -1024 + 8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4)
    save_nifti(tmp_path / "a.nii.gz", hu, LPS_AFFINE)
    volume = read_image(str(tmp_path / "a.nii.gz"))
    assert volume.hu.dtype == np.int16
    np.testing.assert_array_equal(volume.hu, hu)
    # float storage of integral values (some LiTS files) comes back as exact int16
    save_nifti(tmp_path / "f.nii.gz", hu.astype(np.float32), LPS_AFFINE)
    assert read_image(str(tmp_path / "f.nii.gz")).hu.dtype == np.int16
    # truly fractional values stay float
    save_nifti(tmp_path / "g.nii.gz", hu.astype(np.float32) + 0.25, LPS_AFFINE)
    assert read_image(str(tmp_path / "g.nii.gz")).hu.dtype == np.float32


def test_scaled_nifti_applies_slope_and_intercept(tmp_path: Path) -> None:
    stored = np.arange(0, 2000, 10, dtype=np.uint16).reshape(5, 5, 8)
    img = nib.Nifti1Image(stored, LPS_AFFINE)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    volume = read_image(str(tmp_path / "s.nii.gz"))
    np.testing.assert_array_equal(volume.hu, stored.astype(np.int32) - 1024)


def test_msd_layout_with_dataset_json_in_natural_order(tmp_path: Path) -> None:
    cases = {f"liver_{i}": tiny_case(seed=i) for i in (0, 2, 10)}
    root = write_msd(tmp_path / "msd", cases)
    (root / "dataset.json").write_text(json.dumps({"training": [
        {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"} for i in (10, 0, 2)]}))
    (root / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"mac resource fork")
    found = find_cases(str(root))
    assert [c.volume_id for c in found] == ["liver_0", "liver_2", "liver_10"]
    assert all(Path(c.label).exists() for c in found)


def test_lits_layout(tmp_path: Path) -> None:
    hu, label = tiny_case()
    for i in (3, 1):
        save_nifti(tmp_path / "lits" / f"volume-{i}.nii", hu, LPS_AFFINE)
        save_nifti(tmp_path / "lits" / f"segmentation-{i}.nii", label, LPS_AFFINE)
    found = find_cases(str(tmp_path / "lits"))
    assert [c.volume_id for c in found] == ["volume-1", "volume-3"]
    volume = read_case(found[0])
    np.testing.assert_array_equal(volume.label, label)


# ----------------------------------------------------------------------- bad input


def one_case(tmp_path: Path, hu=None, label=None, label_affine=LPS_AFFINE) -> Case:
    base_hu, base_label = tiny_case()
    hu = base_hu if hu is None else hu
    label = base_label if label is None else label
    save_nifti(tmp_path / "img.nii.gz", hu, LPS_AFFINE)
    save_nifti(tmp_path / "seg.nii.gz", label, label_affine)
    return Case("case", str(tmp_path / "img.nii.gz"), str(tmp_path / "seg.nii.gz"))


def expect_error(case: Case, *words: str) -> str:
    with pytest.raises(BadVolumeError) as info:
        read_case(case)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_truncated_file(tmp_path: Path) -> None:
    case = one_case(tmp_path)
    data = Path(case.image).read_bytes()
    Path(case.image).write_bytes(data[: len(data) // 2])
    expect_error(case, "img.nii.gz", "truncated")


def test_corrupt_file(tmp_path: Path) -> None:
    case = one_case(tmp_path)
    Path(case.image).write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    expect_error(case, "img.nii.gz")


def test_label_shape_mismatch(tmp_path: Path) -> None:
    expect_error(one_case(tmp_path, label=np.zeros((40, 32, 11), np.uint8)), "seg.nii.gz", "shape")


def test_label_affine_mismatch(tmp_path: Path) -> None:
    shifted = LPS_AFFINE.copy()
    shifted[2, 3] = 5.0
    expect_error(one_case(tmp_path, label_affine=shifted), "seg.nii.gz", "affine")


def test_label_values_outside_convention(tmp_path: Path) -> None:
    _, label = tiny_case()
    label[0, 0, 0] = 3
    expect_error(one_case(tmp_path, label=label), "seg.nii.gz", "[3]")


def test_nan_voxels(tmp_path: Path) -> None:
    hu, _ = tiny_case()
    hu = hu.astype(np.float32)
    hu[1, 2, 3] = np.nan
    hu[2, 2, 3] = np.inf
    expect_error(one_case(tmp_path, hu=hu), "img.nii.gz", "2 NaN or Inf")


def test_4d_image(tmp_path: Path) -> None:
    hu, _ = tiny_case()
    expect_error(one_case(tmp_path, hu=np.stack([hu, hu], axis=-1)), "img.nii.gz", "4D")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(BadVolumeError, match="no MSD"):
        find_cases(str(tmp_path))
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(BadVolumeError, match="no volumes found"):
        find_cases(str(tmp_path))


def test_missing_label_is_reported_by_prepare(tmp_path: Path) -> None:
    from liver_d2.data.volumes import check_label_present

    case = one_case(tmp_path)
    Path(case.label).unlink()
    with pytest.raises(BadVolumeError, match="missing label"):
        check_label_present(case)
