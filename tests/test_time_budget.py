"""SOLVER.TIME_BUDGET: the arithmetic, the schedule it rescales, and a budgeted tiny run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from liver_d2.config import load_config
from liver_d2.engine.time_budget import RECORD, budgeted_iterations, rescale_schedule
from liver_d2.errors import LiverD2Error
from test_train import DEMO, TINY, check_ok, read_metrics, tiny_root, train_net  # noqa: F401  (fixture)


@pytest.mark.parametrize("per_iter, expected", [(0.236, 2500), (0.40, 1450), (0.1, 2600), (50.0, 50)])
def test_budget_fits_rounds_down_and_is_capped(per_iter, expected):
    # 600 s, 8 s spent calibrating, at most 2600 iterations, multiples of 50
    assert budgeted_iterations(600, 8, per_iter, 2600) == expected


def test_budget_never_exceeds_a_short_cap():
    assert budgeted_iterations(600, 8, 0.01, 4) == 4
    assert budgeted_iterations(1, 8, 1.0, 4) == 4  # nothing left: the cap below one round still runs


def test_schedule_shrinks_with_the_run():
    cfg = load_config(DEMO, ["SOLVER.STEPS", "(2000, 2400)", "TEST.EVAL_PERIOD", "0"])
    cfg.defrost()
    rescale_schedule(cfg, 1300)
    assert cfg.SOLVER.MAX_ITER == 1300
    assert tuple(cfg.SOLVER.STEPS) == (1000, 1200)
    assert cfg.SOLVER.CHECKPOINT_PERIOD == 650
    assert cfg.TEST.VAL_PERIOD == 1300  # "at the end" stays at the end
    assert cfg.TEST.EVAL_PERIOD == 0  # off stays off
    assert cfg.SOLVER.WARMUP_ITERS == 100  # warm-up is not a share of the run


def test_negative_budget_is_one_line():
    with pytest.raises(LiverD2Error, match="SOLVER.TIME_BUDGET"):
        load_config(DEMO, ["SOLVER.TIME_BUDGET", "-5"])


def test_budgeted_run_sizes_its_schedule_and_resume_keeps_it(tiny_root, tmp_path: Path):
    out = tmp_path / "budget"
    args = ["--config-file", DEMO, *TINY, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2000",
            "SOLVER.TIME_BUDGET", "10", "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.VAL_PERIOD", "2000",
            "DATASETS.TEST", "()"]
    check_ok(train_net(tiny_root, *args))
    record = json.loads((out / RECORD).read_text())
    max_iter = record["max_iter"]
    assert record["configured_max_iter"] == 2000 and 50 <= max_iter < 2000 and max_iter % 50 == 0
    assert record["seconds_per_iteration"] * max_iter <= 10 - record["calibration_s"] + 1e-6
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["SOLVER"]["MAX_ITER"] == max_iter and saved["TEST"]["VAL_PERIOD"] == max_iter
    assert max(m["iteration"] for m in read_metrics(out)) == max_iter - 1
    assert any("val/bbox/AP" in m for m in read_metrics(out))  # validation still ran, at the end
    assert "measured now" in (out / "log.txt").read_text()

    check_ok(train_net(tiny_root, "--resume", *args))
    log = (out / "log.txt").read_text()
    assert f"from {RECORD}): MAX_ITER {max_iter} " in log
    start = int(re.findall(r"Starting training from iteration (\d+)", log)[-1])
    assert start >= max_iter  # the finished schedule is kept: nothing left to train
    assert json.loads((out / RECORD).read_text()) == record
