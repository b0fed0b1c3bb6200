"""The lecture's nine models: its reported test accuracies beside ours, for docs/lecture.md.

    python -m mlpsweep.lecture --sweep lecture-all-3seeds    # rewrites the results in docs/lecture.md

Runs are matched to presets by their four axes (activation, norm, dropout, depth), which differ
between all nine lecture models.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from scipy import stats

from mlpsweep.config import CONFIG_DIR
from mlpsweep.report import ReportError, Sweep, markdown_table, open_sweep
from mlpsweep.stats import summarize
from mlpsweep.tracking import axes

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass(frozen=True)
class LectureModel:
    preset: str
    name: str
    hidden: str
    blocks: str
    epochs: int
    test_acc: float


LECTURE = [
    LectureModel("one_layer", "OneLayerModel", "200, no bias", "ReLU", 25, 0.9802),
    LectureModel("mlp", "MLP", "165, 165", "ReLU", 25, 0.9827),
    LectureModel("mlp_sigmoid", "MLP_Sigmoid", "1024, 300", "Sigmoid", 10, 0.9307),
    LectureModel("mlp_tanh", "MLPTanh", "1024, 300", "Tanh", 10, 0.9781),
    LectureModel("mlp_relu", "MLPReLU", "1024, 300", "ReLU", 10, 0.9823),
    LectureModel("mlp_sigmoid_batchnorm", "MLP_SigmoidBatchNorm", "1024, 300", "Linear-BN-Sigmoid", 10, 0.9646),
    LectureModel("mlp_relu_batchnorm", "MLPReLUBatchNorm", "1024, 300", "Linear-BN-ReLU", 10, 0.9834),
    LectureModel("dropout", "Dropout", "32", "ReLU-Dropout(0.2)", 25, 0.9612),
    LectureModel("mlp_dropout", "MLPDropout", "165, 165", "Linear-BN-ReLU-Dropout(0.2)", 25, 0.9838),
]


def preset_axes(preset: str) -> dict[str, str]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return axes(compose(config_name="train", overrides=[f"lecture={preset}"]))


def verdict(lecture_acc: float, ours: list[float]) -> tuple[str, str]:
    """Whether one lecture run is within our seed noise: inside the 95% prediction interval of a
    single new run, mean ± t(n-1) * s * sqrt(1 + 1/n)."""
    summary = summarize(ours)
    diff = 100 * (lecture_acc - summary.mean)
    if summary.n < 2:
        return f"{diff:+.2f} pp", "needs repeated seeds"
    half = stats.t.ppf(0.975, summary.n - 1) * summary.std * math.sqrt(1 + 1 / summary.n)
    low, high = summary.mean - half, summary.mean + half
    inside = low <= lecture_acc <= high
    return f"{diff:+.2f} pp", ("within seed noise" if inside else "beyond seed noise") + f" [{low:.4f}, {high:.4f}]"


def results_table(sweep: Sweep) -> str:
    rows = []
    finished = sweep.finished
    for model in LECTURE:
        wanted = preset_axes(model.preset)
        runs = finished[(finished[list(wanted)] == list(wanted.values())).all(axis=1)]
        accs = runs.test_acc.tolist()
        summary = summarize(accs) if accs else None
        ours = "not run" if summary is None else (
            f"{summary.mean:.4f} ± {summary.std:.4f} (n={summary.n})" if summary.n > 1 else f"{summary.mean:.4f} (n=1)"
        )
        lecture_minus_ours, noise = verdict(model.test_acc, accs) if accs else ("", "")
        rows.append([model.name, model.hidden, model.blocks, model.epochs, f"{model.test_acc:.4f}", ours,
                     lecture_minus_ours, noise, f"`lecture={model.preset}`"])  # fmt: skip
    columns = ["lecture model", "hidden layers", "blocks", "epochs", "lecture's test acc", "ours: mean ± std",
               "lecture - ours", "lecture's run vs our 95% prediction interval", "preset"]  # fmt: skip
    return markdown_table(pd.DataFrame(rows, columns=columns))


def main() -> None:
    parser = argparse.ArgumentParser(description="Rewrite the results table of docs/lecture.md from a sweep.")
    parser.add_argument("--sweep", help="parent run id or name (default: the latest sweep)")
    parser.add_argument("--experiment", default="mlpsweep")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--doc", type=Path, default=CONFIG_DIR.parent / "docs" / "lecture.md")
    args = parser.parse_args()
    try:
        sweep = open_sweep(args.tracking_uri, args.experiment, args.sweep)[1]
    except ReportError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    block = f"{BEGIN}\nSweep `{sweep.name}` ({len(sweep.finished)} finished runs):\n\n{results_table(sweep)}\n{END}"
    text = args.doc.read_text()
    args.doc.write_text(re.sub(f"{re.escape(BEGIN)}.*{re.escape(END)}", lambda _: block, text, flags=re.S))
    print(block)


if __name__ == "__main__":
    main()
