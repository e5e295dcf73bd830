"""The real 3D-IRCADb-01 patient 17 scan, checked against the figures in its README.

Skips when ../shared is absent (people who clone the project do not have it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from liver_d2.data.prepare import PrepareOptions, prepare_dataset
from liver_d2.data.volumes import Case, read_case, read_image


def msd_view(scan: Path, root: Path) -> Path:
    """The scan as a one-volume MSD folder, through links (never copied)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "liver_17.nii.gz").symlink_to(scan / "volume.nii.gz")
    (root / "labelsTr" / "liver_17.nii.gz").symlink_to(scan / "segmentation.nii.gz")
    return root


def test_reader_matches_readme_figures(shared_scan: Path) -> None:
    volume = read_case(Case("ircad17", str(shared_scan / "volume.nii.gz"), str(shared_scan / "segmentation.nii.gz")))
    assert volume.shape == (512, 512, 119)
    assert volume.hu.dtype == np.int16 and volume.hu.min() == -1024 and volume.hu.max() == 1023
    np.testing.assert_allclose(volume.spacing, (0.743, 0.743, 1.6), atol=1e-3)
    assert int((volume.label == 2).sum()) == 185_990
    assert int((volume.label == 1).sum()) == 1_920_507


def test_prepare_matches_readme_figures(shared_scan: Path, tmp_path: Path) -> None:
    root = msd_view(shared_scan, tmp_path / "msd")
    out = tmp_path / "prep"
    result = prepare_dataset(str(root), str(out), PrepareOptions(split_ratios=(1, 0, 0), workers=1), "ircad")
    assert result.failures == []
    record = json.loads((out / "volumes" / "liver_17.json").read_text())
    assert sorted(les["voxels"] for les in record["lesions"]) == [89_029, 96_961]
    index = pd.read_csv(out / "index.csv")
    tumor_slices = index[index.has_tumor].slice_index
    assert tumor_slices.min() == 78 and tumor_slices.max() == 113  # 84-113 and 78-105
    assert len(tumor_slices) == 36


def test_dicom_slices_equal_nifti_slices(shared_scan: Path) -> None:
    nifti = read_image(str(shared_scan / "volume.nii.gz"))
    dicom = read_image(str(shared_scan / "dicom_subset"))
    assert dicom.hu.shape == (512, 512, 16)
    np.testing.assert_array_equal(dicom.hu, nifti.hu[:, :, 78:94])
    np.testing.assert_allclose(dicom.affine[:3, :3], nifti.affine[:3, :3], atol=1e-4)
