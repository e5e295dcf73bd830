"""Shared fixtures: tiny hand-made CT cases, and the path to the real shared scan."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SCAN = Path(os.environ.get("LIVER_D2_SHARED", REPO.parent / "shared")) / "data" / "ircadb01_17"


def tiny_case(shape=(40, 32, 12), tumors=((20, 12, 6, 3),), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An LPS-ordered int16 HU volume and 0/1/2 label: a box-shaped liver on slices 2..9
    and spherical tumors given as (x, y, z, radius in voxels)."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, -900, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[5:35, 4:28, 2:10] = 1
    hu[label == 1] = 60 + rng.integers(-15, 15, size=int((label == 1).sum()))
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for cx, cy, cz, r in tumors:
        ball = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r * r
        label[ball] = 2
        hu[ball] = 20
    return hu, label


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


LPS_AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS index order in NIfTI's RAS world


def write_msd(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], affine=LPS_AFFINE) -> Path:
    """Write cases in the MSD Task03 layout (imagesTr/labelsTr, no dataset.json)."""
    for name, (hu, label) in cases.items():
        save_nifti(root / "imagesTr" / f"{name}.nii.gz", hu, affine)
        save_nifti(root / "labelsTr" / f"{name}.nii.gz", label, affine)
    return root


@pytest.fixture
def msd_root(tmp_path: Path) -> Path:
    """Six tiny volumes with 1-2 tumors each (and one without), in the MSD layout."""
    cases = {}
    for i in range(6):
        tumors = [] if i == 5 else [(12 + i, 10, 4 + i % 3, 2), (28, 20, 6, 3)][: 1 + i % 2]
        cases[f"liver_{i}"] = tiny_case(tumors=tumors, seed=i)
    return write_msd(tmp_path / "msd", cases)


@pytest.fixture
def shared_scan() -> Path:
    if not SHARED_SCAN.is_dir():
        pytest.skip(f"real scan not available at {SHARED_SCAN}")
    return SHARED_SCAN


def load_and_check_backbone(model, path: str, expected: dict) -> dict:
    """Load ``path`` into ``model`` and check every backbone tensor now equals ``expected``
    and none kept its initial value; returns the loaded backbone tensors."""
    import torch

    from liver_d2.engine.checkpoint import LiverCheckpointer

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    LiverCheckpointer(model).load(path)
    loaded = {k: v for k, v in model.state_dict().items()
              if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")}
    assert set(loaded) == set(expected)
    for k, v in loaded.items():
        assert torch.equal(v, expected[k]), k
        assert not torch.equal(v, initial[k]), f"{k} kept its initial value"
    return loaded
