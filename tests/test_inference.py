"""VolumePredictor, tools/predict.py, tools/evaluate_volumes.py and TorchScript export, with
a tiny random-weight RetinaNet (score threshold 0, so it always finds "lesions") on tiny
phantoms. What is checked is the plumbing: orientation, grids, files, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from liver_d2.config import load_config
from liver_d2.data.phantoms import write_phantom_dataset
from liver_d2.data.volumes import to_canonical
from liver_d2.engine.checkpoint import LiverCheckpointer
from liver_d2.engine.trainer import Trainer
from liver_d2.errors import LiverD2Error
from liver_d2.inference import VolumePredictor
from liver_d2.inference.export import sample_input, trace_model
from liver_d2.inference.writers import box_label_map, write_box_nifti

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo" / "retinanet_R18_phantom_cpu.yaml")
TINY_MODEL = ["MODEL.FPN.OUT_CHANNELS", "16", "MODEL.RETINANET.NUM_CONVS", "1", "MODEL.RETINANET.SCORE_THRESH_TEST",
              "0.0", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "5"]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(str(root), 2, seed=3, workers=1, shape=(64, 64, 12), verbose=False)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A training-output-like folder: config.yaml + model_final.pth (random weights)."""
    out = tmp_path_factory.mktemp("model")
    cfg = load_config(DEMO, TINY_MODEL + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    LiverCheckpointer(model, str(out)).save("model_final")
    (out / "config.yaml").write_text(cfg.dump())
    return out


@pytest.fixture(scope="module")
def predictor(model_dir) -> VolumePredictor:
    return VolumePredictor(str(model_dir), batch_size=4)


def _scan(phantoms: Path, i: int = 0) -> str:
    return str(sorted((phantoms / "imagesTr").iterdir())[i])


def test_predicts_lesions_inside_the_volume(predictor, phantoms) -> None:
    pred = predictor(_scan(phantoms))
    assert pred.slices_run == 12 and pred.detections and pred.lesions
    shape = np.array(pred.volume.shape)
    for lesion in pred.lesions:
        lo, hi = np.array(lesion["box"])
        assert (lo >= 0).all() and (hi <= shape).all() and (hi > lo).all()
        assert lesion["num_slices"] == len({b["slice_index"] for b in lesion["slice_boxes"]})
        assert lesion["max_score"] >= lesion["mean_score"]
    scores = [l["max_score"] for l in pred.lesions]
    assert scores == sorted(scores, reverse=True)
    again = predictor(_scan(phantoms))
    assert again.lesions == pred.lesions  # deterministic


def test_other_orientation_gives_the_same_findings(predictor, phantoms, tmp_path) -> None:
    """A scan stored RAS instead of LPS goes through the same reader: same lesions."""
    img = nib.load(_scan(phantoms))
    flipped = np.asarray(img.dataobj)[::-1, ::-1, :]
    affine = img.affine @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, -1, 0, img.shape[1] - 1], [0, 0, 1, 0],
                                    [0, 0, 0, 1]])
    path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), affine), str(path))
    assert nib.aff2axcodes(affine) != nib.aff2axcodes(img.affine)
    a, b = predictor(_scan(phantoms)), predictor(str(path))
    assert [l["box"] for l in a.lesions] == [l["box"] for l in b.lesions]


def test_liver_mask_runs_only_liver_slices(predictor, phantoms) -> None:
    label_path = str(sorted((phantoms / "labelsTr").iterdir())[0])
    label = nib.load(label_path).get_fdata()
    liver_slices = int((label > 0).any(axis=(0, 1)).sum())
    assert 0 < liver_slices < 12
    assert predictor(_scan(phantoms), liver_mask=label_path).slices_run == liver_slices


def test_box_map_lies_on_the_input_grid(predictor, phantoms, tmp_path) -> None:
    img = nib.load(_scan(phantoms))
    ras = tmp_path / "ras.nii.gz"
    ras_affine = img.affine @ np.array([[-1, 0, 0, img.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), ras_affine), str(ras))
    pred = predictor(str(ras))
    out = nib.load(write_box_nifti(pred, str(tmp_path / "boxes.nii.gz")))
    assert out.shape == img.shape and np.allclose(out.affine, ras_affine)
    back, _ = to_canonical(np.asarray(out.dataobj), out.affine)
    assert np.array_equal(back, box_label_map(pred))


def test_export_gives_the_same_boxes(predictor, phantoms) -> None:
    image = sample_input(predictor, _scan(phantoms))
    traced, adapter = trace_model(predictor, image)
    with torch.no_grad():
        eager = predictor.model([{"image": image}])[0]["instances"]
        exported = adapter.outputs_schema(traced(image))[0]["instances"]
    assert len(eager) > 0
    assert torch.allclose(eager.pred_boxes.tensor, exported.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(eager.scores, exported.scores, atol=1e-5)


def test_missing_weights_is_one_line(tmp_path) -> None:
    with pytest.raises(LiverD2Error, match="no model_final.pth or model_best.pth"):
        (tmp_path / "config.yaml").write_text(load_config(DEMO).dump())
        VolumePredictor(str(tmp_path))


def _dicom_series(folder: Path, zs: list[float]) -> None:
    from test_dicom import _series

    folder.mkdir()
    _series(folder, zs)


def test_predict_tool_on_a_folder_with_bad_scans(model_dir, phantoms, tmp_path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        (scans / Path(_scan(phantoms, i)).name).write_bytes(Path(_scan(phantoms, i)).read_bytes())
    good = (scans / Path(_scan(phantoms, 0)).name).read_bytes()
    (scans / "cut.nii.gz").write_bytes(good[: len(good) // 2])  # truncated
    _dicom_series(scans / "gap_series", [0.0, 2.5, 5.0, 10.0])  # a missing slice
    _dicom_series(scans / "good_series", [0.0, 2.5, 5.0, 7.5])  # tiny, identifying fields set
    out = tmp_path / "out"
    r = _run("predict.py", "--model", str(model_dir), "--input", str(scans), "--out", str(out), "--nifti",
             "--min-score", "0")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "cut.nii.gz: corrupt or truncated NIfTI" in r.stderr
    assert "gap_series: missing slice" in r.stderr
    assert "3 of 5 scans done" in r.stdout
    table = pd.read_csv(out / "lesions.csv")
    assert set(table.volume_id) <= {"liver_0", "liver_1", "good_series"} and len(table) > 0
    record = json.loads((out / "good_series.json").read_text())
    text = (out / "good_series.json").read_text()
    assert "patient" not in record and "Doe" not in text and "12345" not in text
    assert record["dicom"]["Manufacturer"] == "Acme"
    for vid in ("liver_0", "liver_1", "good_series"):
        assert (out / f"{vid}_boxes.nii.gz").exists() and (out / "overlays" / f"{vid}_montage.png").exists()
    r = _run("predict.py", "--model", str(model_dir), "--input", str(scans / "good_series"), "--out", str(out),
             "--include-patient-fields")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "good_series.json").read_text())["patient"]["PatientName"] == "Doe^Jane"


def test_empty_result_is_valid(model_dir, tmp_path) -> None:
    """An all-air scan with a high threshold: no lesions, still a JSON, a CSV header and a montage."""
    air = tmp_path / "air.nii.gz"
    nib.save(nib.Nifti1Image(np.full((32, 32, 4), -1000, np.int16), np.eye(4)), str(air))
    r = _run("predict.py", "--model", str(model_dir), "--input", str(air), "--out", str(tmp_path / "o"),
             "--score-thresh", "0.99")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "air.json").read_text())["lesions"] == []
    assert pd.read_csv(tmp_path / "o" / "lesions.csv").empty
    assert (tmp_path / "o" / "overlays" / "air_montage.png").exists()


def test_empty_volume_and_no_scans_are_one_line(model_dir, tmp_path) -> None:
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 8, 8), np.int16), np.eye(4)), str(empty))
    r = _run("predict.py", "--model", str(model_dir), "--input", str(empty), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "empty volume" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "nothing").mkdir()
    r = _run("predict.py", "--model", str(model_dir), "--input", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no NIfTI files or DICOM series found" in r.stderr


def test_evaluate_volumes_scores_saved_predictions(model_dir, phantoms, tmp_path) -> None:
    out = tmp_path / "pred"
    r = _run("predict.py", "--model", str(model_dir), "--input", str(phantoms / "imagesTr"), "--out", str(out),
             "--overlays", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    (out / "stray.json").write_text("{not json")
    r = _run("evaluate_volumes.py", "--predictions", str(out), "--data", str(phantoms))
    assert r.returncode == 1 and "stray.json: not a liver_d2 prediction file" in r.stderr
    metrics = json.loads((out / "evaluation" / "lesion_metrics.json").read_text())
    from scipy import ndimage

    truth = sum(ndimage.label(nib.load(str(p)).get_fdata() == 2, np.ones((3, 3, 3)))[1]
                for p in (phantoms / "labelsTr").iterdir())
    assert metrics["volumes"] == 2 and metrics["lesions"] == truth and 0.0 <= metrics["CPM"] <= 1.0
    assert (out / "evaluation" / "froc.png").exists() and (out / "evaluation" / "pr.png").exists()


def test_fusing_three_identical_predictions_gives_the_same(predictor, phantoms) -> None:
    from liver_d2.inference.ensemble import EnsemblePredictor, fuse_lesions

    single = predictor(_scan(phantoms))
    fused = fuse_lesions([single.lesions] * 3)
    assert len(fused) == len(single.lesions)
    for a, b in zip(sorted(single.lesions, key=lambda l: l["box"]), sorted(fused, key=lambda l: l["box"])):
        assert np.allclose(a["box"], b["box"]) and a["max_score"] == pytest.approx(b["max_score"])
        assert a["longest_diameter_mm"] == pytest.approx(b["longest_diameter_mm"]) and b["num_models"] == 3
    ensemble, members = EnsemblePredictor([predictor] * 3).predict(_scan(phantoms))
    assert len(members) == 3
    assert sorted(tuple(np.round(np.ravel(l["box"]), 6)) for l in ensemble.lesions) == \
        sorted(tuple(np.round(np.ravel(l["box"]), 6)) for l in single.lesions)


def test_fusion_discounts_a_lone_finding() -> None:
    from liver_d2.inference.ensemble import fuse_lesions

    def lesion(lo, hi, score):
        return {"box": [lo, hi], "max_score": score, "longest_diameter_mm": 10.0}

    shared_a, shared_b = lesion([0, 0, 0], [10, 10, 10], 0.9), lesion([1, 0, 0], [11, 10, 10], 0.6)
    lone = lesion([50, 50, 50], [55, 55, 55], 0.9)
    fused = fuse_lesions([[shared_a], [shared_b, lone], []])
    assert [round(l["max_score"], 6) for l in fused] == [0.5, 0.3]  # (0.9 + 0.6) / 3, 0.9 / 3
    # the score-weighted box: x0 = (0.9 * 0 + 0.6 * 1) / 1.5
    assert fused[0]["box"][0][0] == pytest.approx(0.4) and fused[0]["num_models"] == 2


@pytest.fixture(scope="module")
def crop_model_dir(tmp_path_factory, model_dir) -> Path:
    """A two-stage stage-two model (random weights) whose stage one is the tiny model."""
    out = tmp_path_factory.mktemp("crop_model")
    cfg = load_config(DEMO, TINY_MODEL + ["MODEL.DEVICE", "cpu", "INPUT.LIVER_CROP.ENABLED", "True",
                                          "INPUT.LIVER_CROP.SIZE", "96", "INPUT.LIVER_CROP.STAGE1", str(model_dir),
                                          "INPUT.LIVER_CROP.STAGE1_SCORE", "0.0"])
    torch.manual_seed(1)
    LiverCheckpointer(Trainer.build_model(cfg), str(out)).save("model_final")
    (out / "config.yaml").write_text(cfg.dump())
    return out


def test_two_stage_finds_lesions_inside_the_liver_region(crop_model_dir, phantoms) -> None:
    label_path = str(sorted((phantoms / "labelsTr").iterdir())[0])
    pred = VolumePredictor(str(crop_model_dir))(_scan(phantoms), liver_mask=label_path)
    label = nib.load(label_path).get_fdata()
    canonical, _ = to_canonical(label, nib.load(label_path).affine)
    xs, ys, zs = np.nonzero(canonical > 0)
    assert pred.detections and pred.slices_run == len(np.unique(zs))
    margin = 8 + 1  # MARGIN pixels, plus rounding
    for det in pred.detections:
        x0, y0, x1, y1 = det["box"]
        assert x0 >= xs.min() - margin and x1 <= xs.max() + 1 + margin, det
        assert y0 >= ys.min() - margin and y1 <= ys.max() + 1 + margin, det


def test_two_stage_uses_stage_one_without_a_label(crop_model_dir, phantoms, tmp_path) -> None:
    assert VolumePredictor(str(crop_model_dir))(_scan(phantoms)).slices_run > 0  # stage one found "liver"
    cfg = load_config(str(crop_model_dir / "config.yaml"), ["INPUT.LIVER_CROP.STAGE1", ""])
    with pytest.raises(LiverD2Error, match="give a liver label map"):
        VolumePredictor(cfg, str(crop_model_dir / "model_final.pth"))(_scan(phantoms))


def test_axis_ensemble_report(model_dir, phantoms, tmp_path) -> None:
    """Axial and coronal members and their ensemble, predicted on whole scans, scored with
    the lesion metrics and compared in one report whose numbers are the scored ones."""
    coronal = tmp_path / "coronal_model"
    coronal.mkdir()
    cfg = load_config(DEMO, TINY_MODEL + ["MODEL.DEVICE", "cpu", "INPUT.SLICE_AXIS", "coronal"])
    torch.manual_seed(2)
    LiverCheckpointer(Trainer.build_model(cfg), str(coronal)).save("model_final")
    (coronal / "config.yaml").write_text(cfg.dump())
    runs = {"axial": [str(model_dir)], "coronal": [str(coronal)], "ensemble": [str(model_dir), str(coronal)]}
    for name, models in runs.items():
        r = _run("predict.py", "--model", *models, "--input", str(phantoms / "imagesTr"), "--out",
                 str(tmp_path / name), "--overlays", "0")
        assert r.returncode == 0, r.stderr[-2000:]
        r = _run("evaluate_volumes.py", "--predictions", str(tmp_path / name), "--data", str(phantoms))
        assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((tmp_path / "ensemble" / "liver_0.json").read_text())
    assert record["model"]["fusion"] == "3D weighted boxes fusion" and record["axis"] == "axial"
    r = _run("compare.py", "--variants", *(str(tmp_path / n) for n in runs), "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr[-2000:]
    table = pd.read_csv(tmp_path / "report" / "metrics.csv").set_index("variant")
    for name in runs:
        scored = json.loads((tmp_path / name / "evaluation" / "lesion_metrics.json").read_text())
        assert table.loc[name, "CPM"] == pytest.approx(scored["CPM"]) and np.isnan(table.loc[name, "AP"])
    assert (tmp_path / "report" / "froc.png").stat().st_size > 5000
