"""FROC and precision-recall curves, one line per model, and the split difficulty figure
(matplotlib, headless)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_froc(curves: dict, path: str) -> str:
    """Sensitivity against false positives per volume (log axis), marking the FROC rates."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, m in curves.items():
        ax.step(m.froc.fp_per_volume.clip(lower=1e-3), m.froc.sensitivity, where="post",
                label=f"{name} (CPM {m.summary['CPM']:.3f})")
    rates = next(iter(curves.values())).fp_rates if curves else ()
    for r in rates:
        ax.axvline(r, color="0.85", lw=0.8, zorder=0)
    ax.set(xscale="log", xlim=(min(rates, default=0.1) / 2, max(rates, default=8) * 2), ylim=(0, 1.02),
           xlabel="false positives per volume", ylabel="lesion sensitivity", title="FROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pr(curves: dict, path: str) -> str:
    """Lesion-level precision against recall."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, m in curves.items():
        ax.plot(m.pr.recall, m.pr.precision, label=f"{name} (AP3D {m.summary['AP3D']:.3f})")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title="lesion precision-recall")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_difficulty(boxes, ceiling, path: str) -> str:
    """Left: d' of every box (found / missed by the model when known). Right: COCO AP50 and
    APs ceilings against edge error, one line per detectability cut-off."""
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    d = boxes["d_prime"].to_numpy(dtype=float)
    measured = np.isfinite(d)
    bins = np.logspace(-1, 2, 31)
    clipped = np.clip(d[measured], bins[0], bins[-1])
    if "best_iou" in boxes:
        found = boxes["best_iou"].to_numpy()[measured] >= 0.5
        left.hist([clipped[found], clipped[~found]], bins=bins, stacked=True, color=["tab:green", "tab:red"],
                  label=["found (IoU >= 0.5)", "missed"])
        left.legend(fontsize=8)
    else:
        left.hist(clipped, bins=bins, color="tab:blue")
    left.set(xscale="log", xlabel="detectability d' (2.5D footprint mean)", ylabel="boxes",
             title=f"{measured.sum()} of {len(d)} boxes measured")
    for cut in (2, 5):
        left.axvline(cut, color="0.6", lw=0.8, ls="--")
    for (tau, table), style in zip(ceiling.groupby(level="min_d_prime"), ("-", "--", ":", "-.")):
        table = table.droplevel("min_d_prime")
        label = "all found" if tau <= 0 else f"d' >= {tau:g} found"
        right.plot(table.index, table["AP50"], "tab:blue", ls=style, label=f"AP50, {label}")
        right.plot(table.index, table["APs"], "tab:orange", ls=style, label=f"APs, {label}")
    right.set(xlabel="edge error sigma (px)", ylabel="COCO AP (fraction)", ylim=(0, 1.02),
              title="ceiling: perfect ranking, no false positives")
    right.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
