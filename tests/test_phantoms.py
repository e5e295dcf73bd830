"""Synthetic CT phantoms: determinism, label geometry, HU statistics, tumor statistics, MSD files.

Real generation on tiny volumes (no mocks); the statistics are the fixed-yardstick promises
of liver_d2.data.phantoms, so a change that makes the phantoms easier fails here.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from liver_d2.data.phantoms import (FREE_END_SLICES, KINDS, make_phantom, make_rng, sample_tumor_count,
                                    sample_tumor_specs, volume_seed, write_phantom_dataset)

REPO = Path(__file__).resolve().parents[1]
SHAPE = (96, 96, 24)


@pytest.fixture(scope="module")
def phantoms():
    """Ten tiny phantoms: enough for both contrast phases and a few dozen tumors."""
    return [make_phantom(seed, SHAPE) for seed in range(10)]


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = make_phantom(7, SHAPE), make_phantom(7, SHAPE), make_phantom(8, SHAPE)
    assert a.hu.tobytes() == b.hu.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert a.tumors == b.tumors and a.spacing == b.spacing
    assert not np.array_equal(a.hu, c.hu)


def test_arrays_types_and_affine(phantoms):
    p = phantoms[0]
    assert p.hu.shape == p.label.shape == SHAPE
    assert p.hu.dtype == np.int16 and p.label.dtype == np.uint8
    assert p.hu.min() >= -1024 and p.hu.max() <= 3071
    sx, sy, sz = p.spacing
    assert 1.2 * 256 / SHAPE[0] < sx == sy < 1.6 * 256 / SHAPE[0]  # ~350 mm field of view
    assert 2.0 <= sz <= 3.0
    np.testing.assert_allclose(np.diag(p.affine)[:3], [-sx, -sy, sz])  # LPS index order, RAS world


def test_labels_and_anatomy(phantoms):
    for p in phantoms:
        assert set(np.unique(p.label)) <= {0, 1, 2}
        assert (p.label == 1).sum() > 1000
        # One liver, tumors inside it: the union is a single connected piece.
        assert ndimage.label(p.label > 0)[1] == 1
        # Liver-free slices at the top and bottom.
        assert not p.label[:, :, :FREE_END_SLICES].any() and not p.label[:, :, -FREE_END_SLICES:].any()
        # Liver on the patient's right (low x), spine at the back (high y).
        xs = np.nonzero(p.label == 1)[0]
        assert xs.mean() < SHAPE[0] / 2
        bone_y = np.nonzero(p.hu[:, :, SHAPE[2] // 2] > 300)[1]
        assert bone_y.mean() > SHAPE[1] / 2
        for t in p.tumors:
            assert p.label[tuple(t["center_voxel"])] == 2 and t["n_voxels"] >= 1
            assert t["kind"] in KINDS
        assert sum(t["n_voxels"] for t in p.tumors) >= (p.label == 2).sum()  # overlaps counted twice


def test_hu_statistics(phantoms):
    phases = {p.phase for p in phantoms}
    assert phases == {"portal", "unenhanced"}
    for p in phantoms:
        core = ndimage.binary_erosion(p.label == 1, iterations=1)
        v = p.hu[core].astype(float)
        median = np.median(v)
        lo, hi = (95, 135) if p.phase == "portal" else (45, 75)
        assert lo <= median <= hi, (p.phase, median)
        robust_sd = 1.4826 * np.median(np.abs(v - median))  # noise + texture, robust to vessels
        assert 9 <= robust_sd <= 23, robust_sd
        assert 10 <= p.noise_sd <= 20
        air = p.hu[:4, :4, :].astype(float)
        assert abs(air.mean() + 1000) < 10
        assert (p.hu > 400).any() and (p.hu < -700).any()  # bone and air: windowing matters


def test_tumor_statistics_from_sampling():
    specs = sample_tumor_specs(make_rng(0), 5000)
    d = np.array([s["diameter_mm"] for s in specs])
    c = np.array([s["contrast_hu"] for s in specs])
    assert d.min() >= 3.0 and d.max() <= 80.0
    assert (d < 10).mean() >= 1 / 3
    assert (d > 40).mean() > 0.05  # the large ones exist too
    assert np.all((np.abs(c) >= 10) & (np.abs(c) <= 60))
    kinds = np.array([s["kind"] for s in specs])
    for kind, share in zip(KINDS, (0.70, 0.15, 0.15)):
        assert abs((kinds == kind).mean() - share) < 0.03
    assert np.all(c[kinds == "hyperdense"] > 0) and np.all(c[kinds != "hyperdense"] < 0)
    rim = [s["rim_hu"] for s in specs if s["kind"] == "rim"]
    assert min(rim) >= 10 and max(rim) <= 60
    rng = make_rng(1)
    counts = np.array([sample_tumor_count(rng) for _ in range(2000)])
    assert 0.08 < (counts == 0).mean() < 0.25
    assert ((counts >= 1) & (counts <= 6)).mean() > 0.7


def test_generated_tumors(phantoms):
    tumors = [t for p in phantoms for t in p.tumors]
    assert len(tumors) >= 10
    assert all(3 <= t["diameter_mm"] <= 80 and 10 <= abs(t["contrast_hu"]) <= 60 for t in tumors)
    assert sum(not p.tumors for p in phantoms) < len(phantoms) / 2


def test_write_dataset_msd_layout_and_resume(tmp_path):
    shape = (64, 64, 12)
    out = tmp_path / "phantoms"
    paths = write_phantom_dataset(str(out), 2, seed=3, workers=2, shape=shape, verbose=False)
    assert [os.path.basename(p) for p in paths] == ["liver_0.nii.gz", "liver_1.nii.gz"]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["modality"] == {"0": "CT"} and dataset["labels"]["2"] == "cancer"
    assert dataset["numTraining"] == 2
    assert dataset["training"][1] == {"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"}
    rows = list(csv.DictReader((out / "phantoms.csv").open()))
    n_tumors = 0
    for i in range(2):
        ref = make_phantom(volume_seed(3, i), shape)  # written in a worker process: same bytes
        image = nib.load(str(out / "imagesTr" / f"liver_{i}.nii.gz"))
        label = nib.load(str(out / "labelsTr" / f"liver_{i}.nii.gz"))
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.header.get_zooms(), ref.spacing, rtol=1e-6)
        np.testing.assert_allclose(image.affine, ref.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), ref.hu)
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), ref.label)
        n_tumors += len(ref.tumors)
    assert len(rows) == n_tumors
    assert not list(out.rglob("*.part"))

    stamps = {p: os.stat(p).st_mtime_ns for p in paths}
    more = write_phantom_dataset(str(out), 3, seed=3, workers=1, shape=shape, verbose=False)
    assert all(os.stat(p).st_mtime_ns == stamps[p] for p in paths)  # finished volumes skipped
    assert os.path.exists(more[2]) and json.loads((out / "dataset.json").read_text())["numTraining"] == 3


def test_cli_runs_from_repo_root(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "tools/make_phantoms.py", "--out", str(out), "--num", "1", "--size", "48",
         "--slices", "12", "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "under 10 mm" in result.stdout and (out / "imagesTr" / "liver_0.nii.gz").exists()
    bad = subprocess.run([sys.executable, "tools/make_phantoms.py", "--out", str(out), "--slices", "4"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "z >= 12" in bad.stderr
