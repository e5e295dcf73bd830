#!/usr/bin/env python
"""Compare model variants in one report: tables and plots from finished runs, training
the ones that have no results yet.

Examples:
    python tools/compare.py                                   # the research comparison on the phantoms
    python tools/compare.py SOLVER.MAX_ITER 300               # the same, shorter training
    python tools/compare.py --variants output/demo output/compare/2.5d --out output/report
    python tools/compare.py --variants configs/retinanet_R_50_FPN_{unnormalized,normalized,augmented}.yaml \\
        --num-gpus 8                                          # the same comparison on MSD Task03

Writes report.md, metrics.csv, ap_by_size.png, pr_curves.png, froc.png and loss_curves.png.
Trailing KEY VALUE pairs are passed to every training that runs.
"""
from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from liver_d2.errors import LiverD2Error
from liver_d2.reports.compare import REPO, resolve_variants, train_variant, write_report

DEFAULT_VARIANTS = [os.path.join(REPO, "configs", "demo", "variants", f"{n}.yaml")
                    for n in ("unnormalized", "normalized", "augmented", "windowed", "2.5d")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="config files and/or finished output folders (default: the five demo variants)")
    p.add_argument("--out", default="output/compare/report", help="report folder (default %(default)s)")
    p.add_argument("--runs", help="where configs' runs go (default: each config's OUTPUT_DIR)")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for trainings that run")
    args = p.parse_args(argv)
    try:
        variants = resolve_variants(args.variants, args.runs)
        todo = [v for v in variants if not v.finished]
        for v in variants:
            print(f"{v.name:>24}: {'results found' if v.finished else 'to train'} in {v.output_dir}")
        failed = []
        for i, v in enumerate(todo, start=1):
            if v.config_file is None:
                raise LiverD2Error(f"{v.output_dir}: no eval_results.json; evaluate it with train_net.py --eval-only")
            print(f"\n[{i}/{len(todo)}] training {v.name} ({v.config_file})", flush=True)
            if train_variant(v, args.opts, args.num_gpus) != 0 or not v.finished:
                failed.append(v.name)
        done = [v for v in variants if v.finished]
        if not done:
            raise LiverD2Error("no variant has results to report")
        paths = write_report(done, args.out)
    except LiverD2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = pd.read_csv(paths["metrics.csv"]).set_index("variant")
    print("\n" + table.to_string(float_format=lambda v: f"{v:.3f}", na_rep="n/a"))
    print(f"\nreport: {paths['report.md']} (+ {', '.join(os.path.basename(p) for p in paths.values() if p.endswith('.png'))})")
    if failed:
        print(f"\n{len(failed)} variant(s) failed to train and are not in the report: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
