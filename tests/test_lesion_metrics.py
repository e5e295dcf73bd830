"""FROC, CPM, 3D AP and recall by size against numbers worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from liver_d2.evaluation.lesion_metrics import box_iou_3d, evaluate_lesions, write_lesion_metrics


def cube(lo, hi):
    return [list(map(float, lo)), list(map(float, hi))]


def test_box_iou_3d() -> None:
    a = cube((0, 0, 0), (10, 10, 10))
    assert box_iou_3d([a], [cube((0, 0, 0), (10, 10, 5))])[0, 0] == pytest.approx(0.5)
    assert box_iou_3d([a], [cube((5, 0, 0), (15, 10, 10))])[0, 0] == pytest.approx(500 / 1500)
    assert box_iou_3d([a], [cube((20, 20, 20), (30, 30, 30))])[0, 0] == 0.0


def _pred(box, score):
    return {"box": box, "max_score": score}


# Volume A: truths g1 (15 mm) and g2 (25 mm); predictions 0.9 on g1 (TP), 0.8 on nothing
# (FP), 0.7 on half of g2 (IoU 0.5, TP), 0.6 on g1 again (FP: g1 already taken).
# Volume B: truth g3 (5 mm); 0.75 with IoU 0.075 (FP, below 0.1), 0.5 exact (TP).
# Pooled by score: TP FP FP TP FP TP -> cumulative TP 1 1 1 2 2 3, FP 0 1 2 2 3 3,
# FP/volume 0 .5 1 1 1.5 1.5, sensitivity 1/3 1/3 1/3 2/3 2/3 1.
G1, G2, G3 = cube((0, 0, 0), (10, 10, 10)), cube((20, 20, 20), (30, 30, 30)), cube((0, 0, 0), (4, 4, 4))
VOLUMES = {
    "A": ([_pred(G1, 0.9), _pred(cube((50, 50, 50), (55, 55, 55)), 0.8), _pred(cube((20, 20, 20), (30, 30, 25)), 0.7),
           _pred(G1, 0.6)],
          [{"box": G1, "diameter_mm": 15.0}, {"box": G2, "diameter_mm": 25.0}]),
    "B": ([_pred(cube((0, 0, 0), (4, 4, 0.3)), 0.75), _pred(G3, 0.5)], [{"box": G3, "diameter_mm": 5.0}]),
}


def test_froc_cpm_and_ap_by_hand() -> None:
    m = evaluate_lesions(VOLUMES)
    s = m.summary
    # sensitivity at FP/volume <= rate: 1/3 up to 0.5, 2/3 at 1 (the 4th point), 1 from 1.5 on
    expected = {0.125: 1 / 3, 0.25: 1 / 3, 0.5: 1 / 3, 1.0: 2 / 3, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0}
    for rate, sens in expected.items():
        assert s[f"sens@{rate:g}"] == pytest.approx(sens), rate
    assert s["CPM"] == pytest.approx((3 * (1 / 3) + 2 / 3 + 3 * 1.0) / 7)
    # precision 1 1/2 1/3 2/4 2/5 3/6, envelope 1 .5 .5 .5 .5 .5: AP = 1/3*1 + 1/3*.5 + 1/3*.5
    assert s["AP3D"] == pytest.approx(2 / 3)
    assert (s["recall_<10mm"], s["recall_10-20mm"], s["recall_>20mm"], s["recall"]) == (1.0, 1.0, 1.0, 1.0)
    assert m.per_volume.set_index("volume_id").loc["A", ["tp", "fp", "fn"]].tolist() == [2, 2, 0]
    assert m.per_volume.set_index("volume_id").loc["B", ["tp", "fp", "fn"]].tolist() == [1, 1, 0]
    assert np.allclose(m.froc.fp_per_volume, [0, 0.5, 1, 1, 1.5, 1.5])


def test_stricter_iou_and_missed_small_lesion() -> None:
    # At IoU 0.6 the half-overlapping 0.7 prediction on g2 no longer counts.
    s = evaluate_lesions(VOLUMES, iou_thresh=0.6).summary
    assert s["recall_>20mm"] == 0.0 and s["recall"] == pytest.approx(2 / 3)


def test_tied_scores_form_one_operating_point() -> None:
    vols = {"A": ([_pred(G1, 0.5), _pred(G2, 0.5)], [{"box": G1, "diameter_mm": 15.0}])}
    m = evaluate_lesions(vols)
    assert len(m.froc) == 1  # TP and FP at one threshold: no point with the TP alone
    assert m.summary["sens@0.5"] == 0.0 and m.summary["sens@1"] == 1.0


def test_no_predictions_and_no_truths() -> None:
    s = evaluate_lesions({"A": ([], [{"box": G1, "diameter_mm": 3.0}]), "B": ([], [])}).summary
    assert s["CPM"] == 0.0 and s["recall_<10mm"] == 0.0 and np.isnan(s["recall_>20mm"])


def test_written_tables_and_plots(tmp_path) -> None:
    paths = write_lesion_metrics(evaluate_lesions(VOLUMES), str(tmp_path))
    for p in paths:
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 0
    assert {"froc.png", "pr.png", "lesion_metrics.json"} <= {p.split("/")[-1] for p in paths}
