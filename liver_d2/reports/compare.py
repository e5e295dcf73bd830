"""One report comparing model variants: tables (Markdown, CSV) and PNG plots.

A variant is a finished training output folder (``config.yaml``, ``eval_results.json``,
``metrics.json``, the test predictions and lesion curves under ``inference/``) or a config
file whose OUTPUT_DIR is trained first. Every number in the report is read from those
files, so the report and the folders always agree.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from liver_d2.config import load_config  # noqa: E402
from liver_d2.errors import LiverD2Error  # noqa: E402

SLICE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LESION_METRICS = ("CPM", "AP3D", "recall", "recall_<10mm", "recall_10-20mm", "recall_>20mm")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Variant:
    name: str
    output_dir: str
    config_file: Optional[str] = None  # set when the variant came as a config (trained if needed)

    @property
    def lesion_only(self) -> bool:
        """A tools/predict.py folder scored by tools/evaluate_volumes.py (e.g. an ensemble):
        lesion metrics only, no slice AP or training curves."""
        return os.path.isfile(os.path.join(self.output_dir, "evaluation", "lesion_metrics.json"))

    @property
    def finished(self) -> bool:
        return self.lesion_only or os.path.isfile(os.path.join(self.output_dir, "eval_results.json"))


def resolve_variants(items: Sequence[str], out_root: Optional[str] = None) -> list[Variant]:
    """Configs (``.yaml``) or finished output folders, named after the file or folder."""
    variants = []
    for item in items:
        if os.path.isdir(item):
            variant = Variant(os.path.basename(os.path.normpath(item)), item)
            if not variant.lesion_only and not os.path.isfile(os.path.join(item, "config.yaml")):
                raise LiverD2Error(f"{item}: neither a training output folder (config.yaml) nor scored "
                                   "predictions (evaluation/lesion_metrics.json from tools/evaluate_volumes.py)")
            variants.append(variant)
        elif item.endswith((".yaml", ".yml")):
            name = os.path.splitext(os.path.basename(item))[0]
            output_dir = os.path.join(out_root, name) if out_root else load_config(item).OUTPUT_DIR
            variants.append(Variant(name, output_dir, item))
        else:
            raise LiverD2Error(f"{item}: neither a config .yaml nor a training output folder")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise LiverD2Error(f"two variants share a name ({names}); give folders or configs with distinct names")
    return variants


def train_variant(variant: Variant, opts: Sequence[str] = (), num_gpus: int = 1) -> int:
    """tools/train_net.py for a variant that has no results yet (a subprocess: each run
    sets up its own logging, seed and process group, as from the command line)."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", variant.config_file,
           "--num-gpus", str(num_gpus), *opts, "OUTPUT_DIR", variant.output_dir]
    return subprocess.call(cmd)


def read_results(variant: Variant) -> dict:
    """One table row: slice COCO metrics and lesion metrics from ``eval_results.json`` (or
    lesion metrics alone from a scored predictions folder)."""
    if variant.lesion_only:
        with open(os.path.join(variant.output_dir, "evaluation", "lesion_metrics.json")) as f:
            results = {"lesion": json.load(f)}
    else:
        with open(os.path.join(variant.output_dir, "eval_results.json")) as f:
            results = json.load(f)
    row: dict = {"variant": variant.name}
    bbox, lesion = results.get("bbox", {}), results.get("lesion", {})
    row.update({k: bbox.get(k, np.nan) for k in SLICE_METRICS})
    row.update({k: lesion.get(k, np.nan) for k in LESION_METRICS})
    return row


def evaluated_folder(variant: Variant) -> Optional[str]:
    """``inference/<test dataset>`` of a variant's first test dataset, if it exists."""
    if variant.lesion_only:
        return None
    cfg = load_config(os.path.join(variant.output_dir, "config.yaml"))
    if not cfg.DATASETS.TEST:
        return None
    folder = os.path.join(variant.output_dir, "inference", cfg.DATASETS.TEST[0])
    return folder if os.path.isdir(folder) else None


def slice_pr_curve(variant: Variant) -> Optional[pd.DataFrame]:
    """COCO precision at IoU 0.5 over 101 recall points (all sizes, 100 detections), from
    the saved test predictions and the split's annotations (pycocotools)."""
    from detectron2.data import MetadataCatalog
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    import liver_d2.data.datasets  # noqa: F401  (registers the prepared splits)

    folder = evaluated_folder(variant)
    results = os.path.join(folder, "coco_instances_results.json") if folder else None
    if not results or not os.path.isfile(results):
        return None
    json_file = MetadataCatalog.get(os.path.basename(folder)).get("json_file")
    if not json_file or not os.path.isfile(json_file):
        return None
    with open(results) as f:
        detections = json.load(f)
    if not detections:
        return pd.DataFrame({"recall": np.linspace(0, 1, 101), "precision": np.zeros(101)})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(json_file)
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, 0, 0, -1]  # IoU .5, recall points, class, area all, maxDets 100
    return pd.DataFrame({"recall": ev.params.recThrs, "precision": np.clip(precision, 0, None)})


def froc_curve(variant: Variant) -> Optional[pd.DataFrame]:
    if variant.lesion_only:
        path = os.path.join(variant.output_dir, "evaluation", "froc.csv")
    else:
        folder = evaluated_folder(variant)
        path = os.path.join(folder, "lesions", "froc.csv") if folder else None
    return pd.read_csv(path) if path and os.path.isfile(path) else None


def loss_curves(variant: Variant) -> pd.DataFrame:
    """Training and validation loss against iteration, from ``metrics.json``."""
    path = os.path.join(variant.output_dir, "metrics.json")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    rows.append({"iteration": d.get("iteration"), "total_loss": d.get("total_loss", np.nan),
                                 "val_loss": d.get("val/total_loss", np.nan)})
    return pd.DataFrame(rows, columns=["iteration", "total_loss", "val_loss"])


# ------------------------------------------------------------------------ plots
def _legend(ax) -> None:
    """The variants' legend, or a note where none of them has data for this plot (e.g.
    loss curves of scored prediction folders, which have none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data for these variants", ha="center", va="center", transform=ax.transAxes)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ap_by_size(table: pd.DataFrame, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    metrics = ["AP", "AP50", "APs", "APm", "APl"]
    x = np.arange(len(metrics))
    width = 0.8 / max(len(table), 1)
    for i, (_, row) in enumerate(table.iterrows()):
        ax.bar(x + i * width, [np.nan_to_num(row[m]) for m in metrics], width, label=row["variant"])
    ax.set(xticks=x + width * (len(table) - 1) / 2, xticklabels=metrics, ylabel="COCO AP (%)",
           title="slice AP by object size (test split)")
    _legend(ax)
    return _save(fig, path)


def plot_curves(curves: dict, x: str, y: str, path: str, title: str, logx: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    for name, df in curves.items():
        if df is not None and len(df):
            ax.plot(df[x], df[y], label=name, drawstyle="steps-post" if logx else "default")
    ax.set(xlabel=x.replace("_", " "), ylabel=y.replace("_", " "), title=title)
    if logx:
        ax.set_xscale("symlog", linthresh=0.1)
    _legend(ax)
    return _save(fig, path)


def plot_losses(losses: dict, path: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for i, (name, df) in enumerate(losses.items()):
        color = f"C{i}"
        train = df.dropna(subset=["total_loss"])
        val = df.dropna(subset=["val_loss"])
        ax.plot(train.iteration, train.total_loss, color=color, label=f"{name} train")
        if len(val):
            ax.plot(val.iteration, val.val_loss, color=color, ls="--", marker="o", label=f"{name} val")
    ax.set(xlabel="iteration", ylabel="total loss", title="training (solid) and validation (dashed) loss")
    _legend(ax)
    return _save(fig, path)


def _markdown(table: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs the extra 'tabulate' package)."""
    cols = list(table.columns)
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) and np.isfinite(v) else ("n/a" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def write_report(variants: Sequence[Variant], out_dir: str) -> dict[str, str]:
    """report.md, metrics.csv and the PNG plots for finished variants; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    table = pd.DataFrame([read_results(v) for v in variants])
    lesion_pct = table[list(LESION_METRICS)]  # lesion numbers are fractions; shown as they are
    paths = {
        "metrics.csv": os.path.join(out_dir, "metrics.csv"),
        "ap_by_size.png": plot_ap_by_size(table, os.path.join(out_dir, "ap_by_size.png")),
        "pr_curves.png": plot_curves({v.name: slice_pr_curve(v) for v in variants}, "recall", "precision",
                                     os.path.join(out_dir, "pr_curves.png"), "slice precision-recall, IoU 0.5"),
        "froc.png": plot_curves({v.name: froc_curve(v) for v in variants}, "fp_per_volume", "sensitivity",
                                os.path.join(out_dir, "froc.png"), "lesion FROC", logx=True),
        "loss_curves.png": plot_losses({v.name: loss_curves(v) for v in variants}, os.path.join(out_dir, "loss_curves.png")),
        "report.md": os.path.join(out_dir, "report.md"),
    }
    table.to_csv(paths["metrics.csv"], index=False)
    md = ["# liver_d2 variant comparison", "",
          "Slice detection on the test split (COCO AP, %), and lesion-level detection in 3D "
          "(CPM = mean sensitivity at 1/8..8 false positives per volume; AP3D and recalls as fractions).", "",
          _markdown(table[["variant", *SLICE_METRICS]]), "", _markdown(pd.concat([table[["variant"]], lesion_pct], axis=1)),
          "", "Output folders:", ""] + [f"- {v.name}: `{v.output_dir}`" for v in variants] + [
          "", "![AP by size](ap_by_size.png)", "![precision-recall](pr_curves.png)", "![FROC](froc.png)",
          "![losses](loss_curves.png)", ""]
    with open(paths["report.md"], "w") as f:
        f.write("\n".join(md))
    return paths
