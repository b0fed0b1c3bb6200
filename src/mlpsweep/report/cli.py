"""The report's command line: `python report.py`, `python -m mlpsweep.report`, `mlpsweep-report`.

    python report.py [--sweep NAME_OR_ID] [--experiment NAME] [--tracking-uri URI] [--out DIR]
                     [--baseline AXIS=VALUE] [--margin-pp PP]

writes DIR/<sweep name>/: report.md, a self-contained report.html, runs.csv, cells.csv, anova.csv,
effects.csv and figures/*.png, and logs them to the sweep's parent run under `report/`. The arguments
are checked against the store before anything is written, and the report never creates a store.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

from mlpsweep.report.analysis import MARGIN_PP
from mlpsweep.report.collect import ReportError, check_baselines, open_sweep, parse_baselines
from mlpsweep.report.document import write_report


def margin(text: str) -> float:
    """--margin-pp: a positive number of percentage points."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--margin-pp={text!r}: must be a positive number of percentage points, e.g. 0.2")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare the runs of a sweep from the MLflow store.")
    parser.add_argument("--sweep", help="parent run id or name (default: the latest sweep)")
    parser.add_argument("--experiment", default="mlpsweep")
    parser.add_argument("--tracking-uri", help="default: as train.py ($MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--out", type=Path, default=Path("multirun_reports"))
    parser.add_argument("--baseline", action="append", default=[], metavar="AXIS=VALUE",
                        help="the value an axis's effects are measured against (default: e.g. norm=none)")  # fmt: skip
    parser.add_argument("--margin-pp", type=margin, default=MARGIN_PP, metavar="PP",
                        help=f"equivalence margin in percentage points: a difference that is not significant is "
                             f"'equivalent within ±PP' when a TOST shows it (default {MARGIN_PP})")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        baselines = parse_baselines(args.baseline)
        if args.out.exists() and not args.out.is_dir():
            raise ReportError(f"--out={str(args.out)!r}: must be a folder, and it is a file")
        client, sweep = open_sweep(args.tracking_uri, args.experiment, args.sweep)
        check_baselines(sweep, baselines)
        out = write_report(client, sweep, args.out, baselines, args.margin_pp)
    except ReportError as err:  # one line, nothing written
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"{out / 'report.html'}  ({len(sweep.runs)} runs)")
