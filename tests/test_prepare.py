"""Preparation end to end on tiny volumes: splits, COCO, index, resume, bad volumes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools.coco import COCO

from conftest import REPO, tiny_case, write_msd
from liver_d2.data.prepare import PrepareOptions, prepare_dataset
from liver_d2.data.slice_io import read_hu_slice
from liver_d2.data.slicing import slice_stack
from liver_d2.data.volumes import find_cases, read_case


def prepare(msd_root: Path, out: Path, **kw):
    options = PrepareOptions(workers=kw.pop("workers", 1), **kw)
    return prepare_dataset(str(msd_root), str(out), options, name="liver_tiny")


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_end_to_end_layout_and_coco(msd_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    result = prepare(msd_root, out, workers=2)
    assert result.failures == []
    manifest = load_json(out / "manifest.json")
    volumes = [v for s in manifest["splits"].values() for v in s["volumes"]]
    assert sorted(volumes) == [f"liver_{i}" for i in range(6)]  # every volume in exactly one split
    total_boxes = 0
    for split in ("train", "val", "test"):
        coco = COCO(str(out / "annotations" / f"{split}.json"))  # pycocotools accepts it
        total_boxes += len(coco.getAnnIds())
        for img in coco.dataset["images"]:
            assert img["volume_id"] in manifest["splits"][split]["volumes"]
            assert len(img["context_files"]) == 5
            assert all((out / p).exists() for p in img["context_files"])
            assert img["pixel_spacing"] == pytest.approx([0.8, 0.8])
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann)
            x, y, w, h = ann["bbox"]
            assert mask.sum() == ann["area"]
            assert mask[y:y + h, x:x + w].sum() == mask.sum()  # the box holds the whole component
    # tumors: 5 volumes with 1-2 balls, spread over several axial slices each
    expected = 0
    for case in find_cases(str(msd_root)):
        tumor = slice_stack(read_case(case).label, "axial") == 2
        expected += int(tumor.any(axis=(1, 2)).sum())  # balls: one component per slice... at least
    assert total_boxes >= expected
    assert result.summary.loc["total", "boxes"] == total_boxes


def test_hu_round_trip_of_stored_slices(msd_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    prepare(msd_root, out)
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    case = find_cases(str(msd_root))[2]
    hu = slice_stack(read_case(case).hu, "axial")
    rows = index[(index.volume_id == case.volume_id) & (index.file_name != "")]
    assert len(rows) > 0
    for row in rows.itertuples():
        stored = read_hu_slice(str(out / row.file_name))
        assert stored.dtype == np.int16
        np.testing.assert_array_equal(stored, hu[row.slice_index])


def test_index_table_and_negatives(msd_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    prepare(msd_root, out, negatives_per_positive=1.0)
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    assert len(index) == 6 * 12  # every slice of every volume
    assert set(index.columns) >= {"volume_id", "slice_index", "has_liver", "has_tumor", "num_boxes", "split"}
    chosen = index[index.in_coco]
    positives = chosen[chosen.num_boxes > 0]
    negatives = chosen[chosen.num_boxes == 0]
    assert len(negatives) > 0 and negatives.has_liver.all() and not negatives.has_tumor.any()
    for split, group in chosen.groupby("split"):
        n_pos = (group.num_boxes > 0).sum()
        candidates = index[(index.split == split) & index.has_liver & ~index.has_tumor]
        assert (group.num_boxes == 0).sum() == min(len(candidates), n_pos)
    assert len(positives) == (index.num_boxes > 0).sum()  # every tumor slice is used
    # no negatives at all when asked
    prepare(msd_root, tmp_path / "none", negatives_per_positive=0.0)
    index = pd.read_csv(tmp_path / "none" / "index.csv", keep_default_na=False)
    assert (index[index.in_coco].num_boxes > 0).all()


def test_split_reproducible_and_seeded(msd_root: Path, tmp_path: Path) -> None:
    def splits(out: Path) -> dict:
        return {s: v["volumes"] for s, v in load_json(out / "manifest.json")["splits"].items()}

    prepare(msd_root, tmp_path / "a", seed=3)
    prepare(msd_root, tmp_path / "b", seed=3)
    assert splits(tmp_path / "a") == splits(tmp_path / "b")
    assert (tmp_path / "a/annotations/train.json").read_text() == (tmp_path / "b/annotations/train.json").read_text()
    seen = {json.dumps(splits(tmp_path / "a"))}
    for seed in range(4, 9):
        prepare(msd_root, tmp_path / f"s{seed}", seed=seed)
        seen.add(json.dumps(splits(tmp_path / f"s{seed}")))
    assert len(seen) > 1
    counts = {s: len(v) for s, v in splits(tmp_path / "a").items()}
    assert counts == {"train": 4, "val": 1, "test": 1}


def test_research_protocol_in_order(tmp_path: Path) -> None:
    # ten volumes, each with one ball tumor spanning the same number of slices
    cases = {f"liver_{i}": tiny_case(tumors=[(20, 12, 6, 2)], seed=i) for i in range(10)}
    root = write_msd(tmp_path / "msd", cases)
    prepare(root, tmp_path / "p", split_protocol="research", split_ratios=(0.64, 0.16, 0.2))
    manifest = load_json(tmp_path / "p" / "manifest.json")
    order = lambda s: sorted(manifest["splits"][s]["volumes"], key=lambda v: int(v.split("_")[1]))
    # 80% of tumor slices → first 8 volumes; of those, 80% → first 6.4 → 7 volumes reach it
    assert order("test") == ["liver_8", "liver_9"]
    assert order("train") == [f"liver_{i}" for i in range(7)]
    assert order("val") == ["liver_7"]


def test_resume_skips_finished_volumes(msd_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    prepare(msd_root, out)
    before = (out / "annotations" / "train.json").read_text()
    (out / "volumes" / "liver_3.json").unlink()  # as if killed before this volume finished
    (out / "manifest.json").unlink()
    result = prepare(msd_root, out)
    assert result.skipped == 5
    assert (out / "annotations" / "train.json").read_text() == before
    # changed slicing options are not silently reused
    assert prepare(msd_root, out, context=1).skipped == 0


def test_killed_run_is_not_a_complete_dataset(msd_root: Path, tmp_path: Path) -> None:
    from liver_d2.data.datasets import register_prepared
    from liver_d2.errors import LiverD2Error

    out = tmp_path / "prep"
    prepare(msd_root, out)
    (out / "manifest.json").unlink()
    with pytest.raises(LiverD2Error, match="did not finish"):
        register_prepared(str(out))


def test_bad_volume_is_reported_and_the_rest_prepared(msd_root: Path, tmp_path: Path) -> None:
    bad = msd_root / "imagesTr" / "liver_2.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    _, label = tiny_case()
    label[0, 0, 0] = 7
    from conftest import LPS_AFFINE, save_nifti

    save_nifti(msd_root / "labelsTr" / "liver_4.nii.gz", label, LPS_AFFINE)
    (msd_root / "labelsTr" / "liver_5.nii.gz").unlink()
    out = tmp_path / "prep"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--source", str(msd_root),
         "--out", str(out), "--name", "liver_tiny", "--workers", "2"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 1, proc.stderr
    assert "3 volume(s) skipped" in proc.stderr
    assert "liver_2.nii.gz: corrupt or truncated" in proc.stderr
    assert "liver_4.nii.gz: label values [7]" in proc.stderr
    assert "missing label" in proc.stderr and "Traceback" not in proc.stderr
    manifest = load_json(out / "manifest.json")
    assert sorted(v for s in manifest["splits"].values() for v in s["volumes"]) == ["liver_0", "liver_1", "liver_3"]


def test_empty_source_folder_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--source", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and str(tmp_path) in proc.stderr


def test_registration_by_name(msd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    from liver_d2.data.datasets import register_all

    root = tmp_path / "datasets"
    prepare(msd_root, root / "liver_tiny")
    monkeypatch.setenv("LIVER_D2_DATASETS", str(root))
    names = register_all()
    assert {"liver_tiny_train", "liver_tiny_val", "liver_tiny_test", "liver_msd_train"} <= set(names)
    dicts = DatasetCatalog.get("liver_tiny_train")
    assert MetadataCatalog.get("liver_tiny_train").thing_classes == ["tumor"]
    positives = [d for d in dicts if d["annotations"]]
    assert positives and any(not d["annotations"] for d in dicts)
    ann = positives[0]["annotations"][0]
    assert ann["bbox_mode"] == BoxMode.XYWH_ABS and ann["category_id"] == 0
    assert Path(positives[0]["file_name"]).exists()
    assert {"volume_id", "slice_index", "pixel_spacing", "context_files"} <= set(positives[0])
    # a built-in name that was never prepared says how to prepare it
    from liver_d2.errors import LiverD2Error

    with pytest.raises(LiverD2Error, match="prepare_data.py"):
        DatasetCatalog.get("liver_msd_train")


def test_end_to_end_on_small_phantoms(tmp_path: Path) -> None:
    """The built-in default path: phantoms → tools/prepare_data.py → registered, loadable splits."""
    from liver_d2.data.phantoms import write_phantom_dataset

    source = tmp_path / "phantoms"
    write_phantom_dataset(str(source), 4, seed=1, workers=1, shape=(96, 96, 24), verbose=False)
    env = {**__import__("os").environ, "LIVER_D2_DATASETS": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--source", str(source),
                           "--split-ratios", "0.5", "0.25", "0.25"], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "liver_phantom_train" in proc.stdout and "small" in proc.stdout and "diameter_mm_median" in proc.stdout
    manifest = load_json(tmp_path / "liver_phantom" / "manifest.json")
    assert [len(manifest["splits"][s]["volumes"]) for s in ("train", "val", "test")] == [2, 1, 1]
    index = pd.read_csv(tmp_path / "liver_phantom" / "index.csv")
    assert len(index) == 4 * 24 and index.has_liver.any() and not index.has_liver.all()
    for split in ("train", "val", "test"):
        COCO(str(tmp_path / "liver_phantom" / "annotations" / f"{split}.json"))
