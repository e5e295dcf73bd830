"""FROC and precision-recall curves as PNG, one line per model (matplotlib, headless)."""
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
