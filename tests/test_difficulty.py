"""Split difficulty: per-box detectability, the COCO ceiling under edge error, the tool."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from liver_d2.data.prepare import PrepareOptions, prepare_dataset
from liver_d2.data.slicing import LIVER, TUMOR, component_boxes, slice_stack
from liver_d2.data.volumes import Case, read_case
from liver_d2.evaluation.ceiling import coco_box_stats, edge_errors, ignoring, localisation_ceiling
from liver_d2.evaluation.detectability import box_visibility, context_stack, d_prime_bin
from conftest import REPO, tiny_case, write_msd

NOISE_SD = 10.0


def flat_liver(contrast: float, radius: float, slices: tuple[int, ...], seed: int = 0, size: int = 96,
               depth: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth, size, size) HU and label stacks: a liver of 60 HU with white noise of NOISE_SD,
    and a disc tumor of ``contrast`` HU on the given slices; the disc mask."""
    rng = np.random.default_rng(seed)
    hu = 60.0 + rng.normal(0.0, NOISE_SD, (depth, size, size))
    label = np.full((depth, size, size), LIVER, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius**2
    for k in slices:
        hu[k][disc] += contrast
        label[k][disc] = TUMOR
    return hu, label, disc


def test_d_prime_matches_contrast_times_root_n_over_noise() -> None:
    """White noise: the footprint mean has SD noise / sqrt(n), so d' = |c| sqrt(n) / noise
    on average over noise draws, and scatters by about 1 (the tumor's own noise)."""
    n = int(flat_liver(-8.0, 2.0, (1,))[2].sum())
    draws = [box_visibility(hu[1:2], label[1:2], disc, 0)
             for hu, label, disc in (flat_liver(-8.0, 2.0, (1,), seed=s) for s in range(30))]
    d = np.array([v.d_prime for v in draws])
    assert all(v.footprint_px == n and v.contrast_hu < 0 for v in draws)
    assert d.mean() == pytest.approx(8.0 * np.sqrt(n) / NOISE_SD, rel=0.15)
    assert 0.6 < d.std() < 1.5
    assert np.median([v.background_sd_hu for v in draws]) == pytest.approx(NOISE_SD / np.sqrt(n), rel=0.1)


def test_three_slices_add_the_neighbouring_cross_sections() -> None:
    """A tumor on all three slices: the 2.5D footprint is three discs, d' grows by ~sqrt(3);
    a tumor on the centre slice only gains nothing from its neighbours."""
    hu, label, disc = flat_liver(-6.0, 2.0, (0, 1, 2), seed=1)
    one = box_visibility(hu[1:2], label[1:2], disc, 0)
    three = box_visibility(hu, label, disc, 1)
    assert three.footprint_px == 3 * one.footprint_px
    assert three.background_sd_hu / one.background_sd_hu == pytest.approx(1 / np.sqrt(3), rel=0.2)
    assert three.d_prime > one.d_prime
    hu, label, disc = flat_liver(-6.0, 2.0, (1,), seed=1)
    assert box_visibility(hu, label, disc, 1).footprint_px == int(disc.sum())


def test_invisible_tumor_scores_near_zero_and_often_outranked() -> None:
    hu, label, disc = flat_liver(0.0, 2.0, (1,), seed=2)
    v = box_visibility(hu, label, disc, 1)
    assert v.d_prime < 1.5
    assert v.p_background > 0.05 and v.rivals >= 1


def test_big_tumor_is_measured_on_its_core() -> None:
    """A tumor covering most of the liver leaves no room for its whole footprint: its core
    is measured instead, a lower bound that is still far above any cut-off."""
    hu, label, disc = flat_liver(-30.0, 30.0, (0, 1, 2), seed=3)
    v = box_visibility(hu, label, disc, 1)
    assert np.isfinite(v.d_prime) and v.d_prime > 10
    assert v.footprint_px < 3 * int(disc.sum())


def test_context_stack_cuts_at_the_ends() -> None:
    volume = np.arange(5)[:, None, None] * np.ones((5, 2, 2))
    stack, centre = context_stack(volume, 0, 3)
    assert stack[:, 0, 0].tolist() == [0, 1] and centre == 0
    stack, centre = context_stack(volume, 2, 3)
    assert stack[:, 0, 0].tolist() == [1, 2, 3] and centre == 1


def test_d_prime_bins() -> None:
    assert d_prime_bin(np.array([0.5, 1.0, 2.9, 3.0, 7.0, np.nan])).tolist() == ["<1", "1-2", "2-3", "3-5", ">=5", "n/a"]


def tiny_coco(boxes: list[list[float]], size: int = 64) -> COCO:
    """One image per XYWH box."""
    data = {"images": [{"id": i + 1, "width": size, "height": size} for i in range(len(boxes))],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for i, b in enumerate(boxes)],
            "categories": [{"id": 1, "name": "tumor"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def test_ceiling_is_perfect_without_error_and_falls_with_it() -> None:
    coco = tiny_coco([[10, 10, 4, 4], [20, 20, 6, 3], [5, 20, 40, 40], [30, 5, 3, 3]] * 5)
    table = localisation_ceiling(coco, [0.0, 0.5, 1.5], repeats=2)
    assert table.loc[0.0, "AP"] == pytest.approx(1.0) and table.loc[0.0, "APs"] == pytest.approx(1.0)
    assert table.loc[0.0, "AP"] > table.loc[0.5, "AP"] > table.loc[1.5, "AP"]
    assert table.loc[1.5, "APs"] < table.loc[1.5, "APm"]  # a pixel costs a tiny box more


def test_ceiling_counts_unfound_boxes_as_missed() -> None:
    coco = tiny_coco([[10, 10, 8, 8]] * 10)
    table = localisation_ceiling(coco, [0.0], repeats=1, found={1, 2, 3, 4, 5})
    assert table.loc[0.0, "AP50"] == pytest.approx(0.5, abs=0.02)


def test_ignored_boxes_are_neither_missed_nor_false() -> None:
    coco = tiny_coco([[10, 10, 8, 8], [30, 30, 8, 8]])
    found_one = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 8, 8], "score": 0.9}]
    assert coco_box_stats(coco, found_one)["AP50"] == pytest.approx(0.5, abs=0.02)
    assert coco_box_stats(ignoring(coco, {2}), found_one)["AP50"] == pytest.approx(1.0)
    inside_ignored = found_one + [{"image_id": 2, "category_id": 1, "bbox": [31, 31, 6, 6], "score": 0.95}]
    assert coco_box_stats(ignoring(coco, {2}), inside_ignored)["AP50"] == pytest.approx(1.0)
    assert coco.loadAnns(2)[0]["iscrowd"] == 0  # the original is left alone


def test_edge_errors_are_signed_per_edge() -> None:
    coco = tiny_coco([[10, 10, 8, 8], [30, 30, 4, 4]])
    detections = [{"image_id": 1, "bbox": [10, 11, 8, 9], "score": 0.9},  # top +1, bottom +2
                  {"image_id": 2, "bbox": [50, 50, 4, 4], "score": 0.9}]  # no overlap: not found
    edges = edge_errors(coco, detections)
    assert len(edges) == 1
    assert edges.iloc[0][["left", "top", "right", "bottom"]].tolist() == [0, 1, 0, 2]


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory) -> Path:
    """Tiny volumes with a strong and a faint tumor, prepared as one test split."""
    root = tmp_path_factory.mktemp("difficulty")
    cases = {}
    for i in range(3):
        hu, label = tiny_case(shape=(48, 40, 12), tumors=((14, 12, 6, 3), (32, 26, 6, 2)), seed=i)
        hu[(label == 2) & (np.arange(48)[:, None, None] > 24)] = 58  # the second tumor: liver-like
        cases[f"liver_{i}"] = (hu, label)
    source = write_msd(root / "msd", cases)
    prepare_dataset(str(source), str(root / "liver_hard"), PrepareOptions(workers=1, split_ratios=(0, 0, 1)),
                    name="liver_hard")
    return root


def run_tool(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIVER_D2_DATASETS=str(root))
    return subprocess.run([sys.executable, str(REPO / "tools" / "analyze_difficulty.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_tool_writes_tables_and_png_and_finds_the_faint_tumor_faint(tiny_prepared, tmp_path) -> None:
    coco = json.loads((tiny_prepared / "liver_hard" / "annotations" / "test.json").read_text())
    # a "model" that found every box exactly, plus a false positive in the corner
    predictions = [{"image_id": a["image_id"], "category_id": 1, "score": 0.9, "bbox": a["bbox"]}
                   for a in coco["annotations"]]
    predictions.append({"image_id": coco["images"][0]["id"], "category_id": 1, "score": 0.95, "bbox": [0, 0, 3, 3]})
    pred_file = tmp_path / "results.json"
    pred_file.write_text(json.dumps(predictions))
    out = tmp_path / "out"
    proc = run_tool(tiny_prepared, "--dataset", "liver_hard_test", "--predictions", str(pred_file),
                    "--out", str(out), "--sigmas", "0.5")
    assert proc.returncode == 0, proc.stderr
    for name in ("boxes.csv", "visibility.csv", "ceiling.csv", "edge_errors.csv", "model_by_min_d_prime.csv",
                 "difficulty.png"):
        assert (out / name).stat().st_size > 0
    boxes = pd.read_csv(out / "boxes.csv")
    assert len(boxes) == len(coco["annotations"])
    strong = boxes[boxes["x0"] < 24]  # rows are y, columns x: the first tumor sits at x ~ 14
    faint = boxes[boxes["x0"] >= 24]
    assert strong["d_prime"].min() > 5 and faint["d_prime"].max() < strong["d_prime"].min()
    assert (boxes["best_iou"] == 1).all()
    edges = pd.read_csv(out / "edge_errors.csv")
    assert len(edges) == len(boxes) and (edges[["left", "top", "right", "bottom"]] == 0).all().all()
    assert "COCO ceiling" in proc.stdout


def test_tool_bad_input_is_one_line(tiny_prepared, tmp_path) -> None:
    proc = run_tool(tiny_prepared, "--dataset", "liver_nope_test")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "liver_nope_test" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = run_tool(tiny_prepared, "--dataset", "liver_hard_test", "--predictions", str(bad))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "bad.json" in proc.stderr


def test_real_tumors_are_plainly_visible(shared_scan) -> None:
    """The real scan's two tumors: their large cross-sections stand out from the liver by
    well over Rose's d' of 5."""
    volume = read_case(Case("ircad17", str(shared_scan / "volume.nii.gz"), str(shared_scan / "segmentation.nii.gz")))
    hu, label = slice_stack(volume.hu, "axial"), slice_stack(volume.label, "axial")
    boxes, _ = component_boxes(label == TUMOR)
    scores = []
    for box in boxes:
        if not 3000 <= box.area <= 5000 or box.slice_index % 3:
            continue
        mask = mask_utils.decode({**box.rle, "counts": box.rle["counts"].encode()}).astype(bool)
        h, centre = context_stack(hu, box.slice_index, 3)
        lab, _ = context_stack(label, box.slice_index, 3)
        v = box_visibility(h, lab, mask, centre)
        scores.append((v.d_prime, v.contrast_hu))
    assert len(scores) >= 5
    assert np.median([d for d, _ in scores]) > 5
    assert np.mean([c < 0 for _, c in scores]) > 0.5  # mostly the hypodense parts stand out
