"""tools/train_net.py end to end on tiny phantoms (96 x 96 x 20), on the CPU.

One module-scoped training run (4 iterations, validation every 2) is shared by the tests:
its outputs, ``--eval-only`` on its checkpoint, ``--resume`` from a copy of it, two CPU
processes through ``launch``, and the one-line errors for bad input. Weight conversion
(torchvision ResNet → detectron2 names, stem adapted to the channel count) is checked in
process. Every run is a subprocess with ``LIVER_D2_DATASETS`` pointing at the tiny root,
because datasets register when ``liver_d2.data.datasets`` is imported.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liver_d2.data.phantoms import write_phantom_dataset
from liver_d2.data.prepare import PrepareOptions, prepare_dataset
from liver_d2.errors import LiverD2Error

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = str(REPO / "tools" / "train_net.py")
DEMO = str(REPO / "configs" / "demo" / "retinanet_R18_phantom_cpu.yaml")
SHAPE = (96, 96, 20)

# The demo model, thinned, on the tiny splits. SCORE_THRESH_TEST 0 so an almost untrained
# model still predicts boxes (AP is a number, not NaN, and model_best.pth gets written).
TINY = [
    "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.RETINANET.NUM_CONVS", "1",
    "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "200",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "4",
    "SOLVER.TIME_BUDGET", "0",  # exactly 4 iterations (tests/test_time_budget.py runs a budget)
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.VAL_PERIOD", "2",
    "TEST.VAL_LOSS_IMAGES", "0",
    "TEST.DETECTIONS_PER_IMAGE", "20",
    "TEST.NUM_OVERLAYS", "2",
    "DATASETS.TRAIN", '("liver_tiny_train",)',
    "DATASETS.VAL", '("liver_tiny_val",)',
    "DATASETS.TEST", '("liver_tiny_test",)',
    "SEED", "1",
]


def _boxes(manifest: dict) -> dict[str, int]:
    return {split: info["boxes"] for split, info in manifest["splits"].items()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """<root>/liver_tiny (tumors in every split) and <root>/liver_empty (val/test empty)."""
    base = tmp_path_factory.mktemp("tiny")
    source, root = base / "phantoms", base / "datasets"
    write_phantom_dataset(str(source), 6, seed=0, workers=1, shape=SHAPE, verbose=False)
    for seed in range(20):  # phase 1 is reused, so each extra try only re-splits
        options = PrepareOptions(workers=1, split_ratios=(0.5, 0.25, 0.25), seed=seed)
        prepare_dataset(str(source), str(root / "liver_tiny"), options, name="liver_tiny")
        manifest = json.loads((root / "liver_tiny" / "manifest.json").read_text())
        if min(_boxes(manifest).values()) > 0:
            break
    else:
        pytest.fail(f"no split seed gives every split a tumor: {_boxes(manifest)}")
    prepare_dataset(str(source), str(root / "liver_empty"), PrepareOptions(workers=1, split_ratios=(1, 0, 0)),
                    name="liver_empty")
    return root


def train_net(root: Path, *args: str, one_thread: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """tools/train_net.py in a subprocess. One torch thread by default: on 2 shared cores
    two threads make a step 10-50x slower whenever another process takes a core."""
    env = dict(os.environ, LIVER_D2_DATASETS=str(root))
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    else:  # let train_net split the cores between its processes
        env.pop("OMP_NUM_THREADS", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, TRAIN_NET, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]


def bbox_metrics(d: dict, prefix: str = "bbox/") -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory) -> Path:
    """4 iterations, validation at iterations 2 and 4, checkpoints every 2, test at the end."""
    out = tmp_path_factory.mktemp("train") / "out"
    check_ok(train_net(tiny_root, "--config-file", DEMO, *TINY, "OUTPUT_DIR", str(out)))
    return out


# ------------------------------------------------------------------- training


def test_training_writes_checkpoints_metrics_and_overlays(trained):
    for name in ("model_final.pth", "model_best.pth", "config.yaml", "last_checkpoint"):
        assert (trained / name).is_file(), name
    assert list(trained.glob("events.out.tfevents.*")), "no TensorBoard events"
    metrics = read_metrics(trained)
    val = [m for m in metrics if "val/total_loss" in m]
    assert val and all(math.isfinite(m["val/total_loss"]) for m in val)
    assert any("val/bbox/AP" in m and math.isfinite(m["val/bbox/AP"]) for m in metrics)
    assert any("total_loss" in m and math.isfinite(m["total_loss"]) for m in metrics)
    final = bbox_metrics(metrics[-1])
    assert set(final) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}, metrics[-1]
    assert math.isfinite(final["AP"])
    folder = trained / "inference" / "liver_tiny_test"
    assert (folder / "coco_instances_results.json").is_file()
    assert json.loads((folder / "coco_instances_results.json").read_text()), "no test predictions"
    overlays = sorted((folder / "overlays").glob("*.png"))
    assert 1 <= len(overlays) <= 2, overlays  # TEST.NUM_OVERLAYS 2
    # the best checkpoint is one that training saved (from a validation), not the final one
    best = torch.load(trained / "model_best.pth", map_location="cpu", weights_only=True)
    assert best["iteration"] in (1, 3)


def test_eval_only_reproduces_final_test_metrics(trained, tiny_root, tmp_path):
    out = tmp_path / "eval"
    proc = train_net(tiny_root, "--config-file", str(trained / "config.yaml"), "--eval-only",
                     "MODEL.WEIGHTS", str(trained / "model_final.pth"), "OUTPUT_DIR", str(out))
    check_ok(proc)
    everything = json.loads((out / "eval_results.json").read_text())
    results = everything["bbox"]
    # lesion-level metrics come with the slice AP, from the same pass, with their files
    assert {"CPM", "AP3D", "sens@1", "recall_<10mm"} <= set(everything["lesion"])
    assert 0.0 <= everything["lesion"]["CPM"] <= 1.0
    lesion_dir = out / "inference" / "liver_tiny_test" / "lesions"
    assert (lesion_dir / "froc.png").is_file() and (lesion_dir / "lesions_per_volume.csv").is_file()
    logged = bbox_metrics(read_metrics(trained)[-1])
    assert set(results) == set(logged)
    for k, v in logged.items():
        assert results[k] == pytest.approx(v, abs=1e-6, nan_ok=True), k
    # the same detections, not only the same summary numbers
    before = json.loads((trained / "inference" / "liver_tiny_test" / "coco_instances_results.json").read_text())
    after = json.loads((out / "inference" / "liver_tiny_test" / "coco_instances_results.json").read_text())
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert a["image_id"] == b["image_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    assert sorted((out / "inference" / "liver_tiny_test" / "overlays").glob("*.png"))


def test_resume_continues_at_saved_iteration(trained, tiny_root, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(trained, out)
    (out / "metrics.json").unlink()
    proc = train_net(tiny_root, "--config-file", DEMO, "--resume", *TINY, "OUTPUT_DIR", str(out),
                     "SOLVER.MAX_ITER", "6", "TEST.VAL_PERIOD", "0")
    check_ok(proc)
    log = (out / "log.txt").read_text()
    assert f"Loading from {out / 'model_final.pth'}" in log
    assert "Starting training from iteration 4" in log
    iterations = [m["iteration"] for m in read_metrics(out)]
    assert min(iterations) >= 4 and max(iterations) == 6, iterations  # 6 = the final test line
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 5  # detectron2 counts from 0: the 6th iteration is 5
    first = torch.load(trained / "model_final.pth", map_location="cpu", weights_only=True)
    assert first["iteration"] == 3
    assert any(not torch.equal(first["model"][k], final["model"][k]) for k in first["model"])


def test_two_cpu_processes_train_and_evaluate(tiny_root, tmp_path):
    out = tmp_path / "ddp"
    proc = train_net(tiny_root, "--config-file", DEMO, "--num-gpus", "2", "--dist-url", "auto", *TINY,
                     "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(out),
                     "SOLVER.EMA.ENABLED", "True", one_thread=False)
    check_ok(proc)
    log = (out / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log, log[:2000]
    assert "Starting training from iteration 0" in log
    metrics = read_metrics(out)
    assert any("val/total_loss" in m and "val/bbox/AP" in m and "total_loss" in m for m in metrics), metrics
    assert math.isfinite(bbox_metrics(metrics[-1])["AP"])
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    average = final["weight_average"]["state"]  # the weight average (through DDP) is the final model
    assert all(torch.equal(final["model"][k], average[k]) for k in final["model"])
    assert (out / "inference" / "liver_tiny_test" / "coco_instances_results.json").is_file()


# ----------------------------------------------------------------- bad input


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].strip(), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unregistered_dataset_is_one_line(tiny_root):
    proc = train_net(tiny_root, "--config-file", DEMO, *TINY, "DATASETS.TRAIN", '("nope_train",)')
    assert_one_line_error(proc, "DATASETS.TRAIN", "nope_train", "liver_tiny_train")


def test_missing_weights_is_one_line(tiny_root, tmp_path):
    missing = str(tmp_path / "no_such_weights.pth")
    proc = train_net(tiny_root, "--config-file", DEMO, *TINY, "MODEL.WEIGHTS", missing)
    assert_one_line_error(proc, "MODEL.WEIGHTS", missing)


@pytest.mark.parametrize("processes", [1, 2])
def test_checkpoint_for_other_channel_count_is_one_line(trained, tiny_root, tmp_path, processes):
    """Raised inside main() (in the worker processes when there are two)."""
    weights = str(trained / "model_final.pth")
    proc = train_net(tiny_root, "--config-file", str(trained / "config.yaml"), "--eval-only",
                     "--num-gpus", str(processes), "--dist-url", "auto",
                     "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(tmp_path / "out"),
                     "INPUT.HU.NUM_SLICES", "1", "MODEL.PIXEL_MEAN", "[0.5]", "MODEL.PIXEL_STD", "[0.25]")
    assert_one_line_error(proc, weights, "3 input channels", "gives 1", "config.yaml")


@pytest.mark.parametrize("key, eval_only", [("VAL", False), ("TEST", True)])
def test_empty_split_is_one_line(trained, tiny_root, tmp_path, key, eval_only):
    """liver_empty was prepared with split ratios (1, 0, 0): its val split has no images.
    Found before training starts, not at the first validation."""
    proc = train_net(tiny_root, "--config-file", str(trained / "config.yaml"),
                     *(["--eval-only", "MODEL.WEIGHTS", str(trained / "model_final.pth")] if eval_only else []),
                     "OUTPUT_DIR", str(tmp_path / "out"), f"DATASETS.{key}", '("liver_empty_val",)')
    assert_one_line_error(proc, f"DATASETS.{key}", "liver_empty_val", "val.json", "no images")
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_unknown_mode_is_one_line(tiny_root):
    proc = train_net(tiny_root, "--config-file", DEMO, *TINY, "INPUT.HU.MODE", "nosuchmode")
    assert_one_line_error(proc, "INPUT.HU.MODE", "nosuchmode", "window")


# ---------------------------------------------------------- weight conversion


def build_tiny_model(channels: int, weights: str = ""):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from liver_d2.config import add_liver_config, set_default_pixel_stats

    cfg = get_cfg()
    add_liver_config(cfg)
    cfg.merge_from_file(DEMO)
    cfg.merge_from_list(["MODEL.FPN.OUT_CHANNELS", "16", "MODEL.RETINANET.NUM_CONVS", "1",
                         "MODEL.RESNETS.STEM_OUT_CHANNELS", "64", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "INPUT.HU.NUM_SLICES", str(channels), "MODEL.WEIGHTS", weights])
    set_default_pixel_stats(cfg)
    return build_model(cfg)


@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_resnet18_is_converted_and_stem_adapted(tmp_path, channels):
    import torchvision

    from conftest import load_and_check_backbone

    from liver_d2.engine.checkpoint import STEM_KEY, adapt_stem_channels, torchvision_to_detectron2

    torch.manual_seed(0)
    tv = torchvision.models.resnet18().state_dict()
    # random init leaves BN at weight 1 / bias 0, the same as detectron2's: make every
    # tensor distinct so an entry that was not loaded cannot pass by chance
    tv = {k: (v + torch.rand_like(v) + 0.5 if v.is_floating_point() else v) for k, v in tv.items()}
    path = tmp_path / "r18_tv.pth"
    torch.save(tv, path)
    expected = torchvision_to_detectron2(tv)
    if channels != 3:  # 3 channels take the RGB filter as it is
        expected[STEM_KEY] = adapt_stem_channels(tv["conv1.weight"], channels)
    loaded = load_and_check_backbone(build_tiny_model(channels, str(path)), str(path), expected)
    assert loaded[STEM_KEY].shape[1] == channels
    # a grey image repeated over the channels sees the same filter response as RGB did
    assert torch.allclose(loaded[STEM_KEY].sum(dim=1), tv["conv1.weight"].sum(dim=1), atol=1e-5)


def test_trained_detector_for_other_channel_count_raises(tmp_path):
    from liver_d2.engine.checkpoint import LiverCheckpointer

    path = tmp_path / "detector_1ch.pth"
    torch.save({"model": build_tiny_model(1).state_dict(), "iteration": 3}, path)
    with pytest.raises(LiverD2Error, match="1 input channels.*gives 3"):
        LiverCheckpointer(build_tiny_model(3)).load(str(path))


def test_imagenet_width_resnet_into_the_half_width_demo_raises(tmp_path):
    """detectron2 alone would skip every backbone tensor with a warning and train from scratch."""
    import torchvision

    from liver_d2.config import load_config
    from liver_d2.engine.checkpoint import LiverCheckpointer
    from liver_d2.engine.trainer import Trainer

    path = tmp_path / "r18_tv.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    demo = Trainer.build_model(load_config(DEMO, ["MODEL.DEVICE", "cpu"]))
    with pytest.raises(LiverD2Error, match="64 channels wide.*builds 32.*RES2_OUT_CHANNELS"):
        LiverCheckpointer(demo).load(str(path))


def test_compare_report_matches_the_output_folders(trained, tiny_root, tmp_path):
    """A finished folder plus a config that compare.py trains first; every table number is
    the one in that folder's eval_results.json, and every plot is written."""
    import pandas as pd

    env = dict(os.environ, LIVER_D2_DATASETS=str(tiny_root), OMP_NUM_THREADS="1")
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "compare.py"), "--variants", str(trained), DEMO,
                           "--runs", str(tmp_path / "runs"), "--out", str(report), *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    check_ok(proc)
    assert (tmp_path / "runs" / "retinanet_R18_phantom_cpu" / "eval_results.json").is_file()
    table = pd.read_csv(report / "metrics.csv").set_index("variant")
    folders = {"out": trained, "retinanet_R18_phantom_cpu": tmp_path / "runs" / "retinanet_R18_phantom_cpu"}
    assert set(table.index) == set(folders)
    for name, folder in folders.items():
        results = json.loads((folder / "eval_results.json").read_text())
        for key in ("AP", "AP50", "APs"):
            assert table.loc[name, key] == pytest.approx(results["bbox"][key], nan_ok=True), (name, key)
        for key in ("CPM", "AP3D", "recall"):
            assert table.loc[name, key] == pytest.approx(results["lesion"][key], nan_ok=True), (name, key)
    for png in ("ap_by_size.png", "pr_curves.png", "froc.png", "loss_curves.png"):
        assert (report / png).stat().st_size > 5000, png
    text = (report / "report.md").read_text()
    assert "| out |" in text and "froc.png" in text


def test_two_stage_trains_both_stages(tiny_root, tmp_path):
    """Stage one on the liver boxes (<name>_liver_*), stage two on liver crops; both train
    and evaluate, stage two with full-slice boxes (COCO and lesion metrics)."""
    from liver_d2.data.datasets import load_liver_json

    folder = tiny_root / "liver_tiny"
    dicts = load_liver_json(str(folder / "annotations" / "test.json"), str(folder))
    assert dicts and all(len(d["liver_box"]) == 4 for d in dicts)  # what stage two crops to
    short = ["SOLVER.MAX_ITER", "2", "TEST.VAL_PERIOD", "0", "TEST.NUM_OVERLAYS", "0"]
    stage1 = tmp_path / "stage1"
    check_ok(train_net(tiny_root, "--config-file", DEMO, *TINY, *short, "DATASETS.TRAIN", '("liver_tiny_liver_train",)',
                       "DATASETS.VAL", "()", "DATASETS.TEST", '("liver_tiny_liver_test",)',
                       "DATALOADER.NEGATIVES_PER_POSITIVE", "-1.0", "OUTPUT_DIR", str(stage1)))
    results = json.loads((stage1 / "eval_results.json").read_text())
    assert "bbox" in results and "lesion" not in results
    stage2 = tmp_path / "stage2"
    check_ok(train_net(tiny_root, "--config-file", DEMO, *TINY, *short, "INPUT.LIVER_CROP.ENABLED", "True",
                       "INPUT.LIVER_CROP.SIZE", "64", "INPUT.LIVER_CROP.STAGE1", str(stage1), "OUTPUT_DIR", str(stage2)))
    results = json.loads((stage2 / "eval_results.json").read_text())
    assert math.isfinite(results["bbox"]["AP"]) and "CPM" in results["lesion"]
    dets = json.loads((stage2 / "inference" / "liver_tiny_test" / "coco_instances_results.json").read_text())
    assert dets and all(d["bbox"][0] + d["bbox"][2] <= 96 + 1e-3 for d in dets)  # full-slice coordinates


def test_faster_rcnn_trains_and_evaluates(tiny_root, tmp_path):
    """The second model family through the same trainer, evaluators and predictor."""
    out = tmp_path / "frcnn"
    config = str(REPO / "configs" / "demo" / "faster_rcnn_R18_phantom_cpu.yaml")
    check_ok(train_net(tiny_root, "--config-file", config, *TINY, "SOLVER.MAX_ITER", "2", "TEST.VAL_PERIOD", "0",
                       "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", str(out)))
    results = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(results["bbox"]["AP"]) and "CPM" in results["lesion"]
    from liver_d2.inference import VolumePredictor

    record = json.loads(next((tiny_root / "liver_tiny" / "volumes").glob("*.json")).read_text())
    pred = VolumePredictor(str(out))(record["image"])
    assert pred.slices_run == SHAPE[2] and pred.detections
