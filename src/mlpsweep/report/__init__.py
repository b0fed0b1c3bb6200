"""Compare the runs of one sweep, reading only the MLflow store: `python report.py --help`.

One module per stage: collect (store -> runs DataFrame), analysis (pure statistics: DataFrame in,
tables out), figures, document (Markdown, HTML and CSV files), cli (the command line).
"""

from mlpsweep.report.analysis import (
    AXES,
    comparisons,
    config_summary,
    effect_sentence,
    effects,
    leaderboard,
    ordered_values,
    pivot,
)
from mlpsweep.report.cli import main
from mlpsweep.report.collect import ReportError, Sweep, find_sweep, load_sweep, open_sweep
from mlpsweep.report.document import MAX_NAME, markdown_table, safe_name, write_report

__all__ = [
    "AXES", "MAX_NAME", "ReportError", "Sweep", "comparisons", "config_summary", "effect_sentence", "effects",
    "find_sweep", "leaderboard", "load_sweep", "main", "markdown_table", "open_sweep", "ordered_values", "pivot",
    "safe_name", "write_report",
]  # fmt: skip
