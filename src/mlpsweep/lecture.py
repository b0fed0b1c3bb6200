"""The lecture's nine models: its reported test accuracies beside ours, and its two scientific
questions answered from the runs, for docs/lecture.md.

    python -m mlpsweep.lecture --sweep lecture-all-5seeds --dropout-sweep lecture-mlp-dropout-5seeds

Runs are matched to presets by their axes (activation, norm, dropout, depth, ...), which differ
between all nine lecture models. The questions are answered with the report's analysis
(`mlpsweep.report.analysis`):

- does Batch Normalization help sigmoid more than ReLU? The activation x norm interaction of the
  four 1024-300 presets (sigmoid/ReLU, with/without Batch Normalization);
- does Dropout help the 165-165 MLP? The `mlp` preset against itself with `dropout=lecture`
  (a second sweep: the lecture's MLPDropout also adds Batch Normalization, which confounds it).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from scipy import stats

from mlpsweep.config import CONFIG_DIR
from mlpsweep.report import ReportError, Sweep, markdown_table, open_sweep
from mlpsweep.report.analysis import MARGIN_PP, anova, comparisons
from mlpsweep.stats import summarize
from mlpsweep.tracking import axes

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
QUESTIONS_BEGIN, QUESTIONS_END = "<!-- questions:begin -->", "<!-- questions:end -->"
# the lecture's Batch Normalization slides: sigmoid and ReLU, each with and without it (1024-300, 10 epochs)
BN_PRESETS = ("mlp_sigmoid", "mlp_sigmoid_batchnorm", "mlp_relu", "mlp_relu_batchnorm")


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


def preset_axes(preset: str, *overrides: str) -> dict[str, str]:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return axes(compose(config_name="train", overrides=[f"lecture={preset}", *overrides]))


def _interval(row: pd.Series) -> str:
    return f"{row.diff_pp:+.2f} pp, 95% CI [{row.ci_low_pp:+.2f}, {row.ci_high_pp:+.2f}]"


def batchnorm_question(finished: pd.DataFrame) -> str:
    """Does Batch Normalization help sigmoid more than ReLU? The activation x norm interaction of the
    four BN presets, with the simple effects of Batch Normalization on each activation."""
    runs = pd.concat([preset_runs(finished, preset) for preset in BN_PRESETS])
    if runs.groupby(["activation", "norm"]).size().reindex(pd.MultiIndex.from_product(
            [["sigmoid", "relu"], ["none", "batchnorm"]])).fillna(0).min() < 2:  # fmt: skip
        return "Not answered: it needs at least 2 seeds of each of " + ", ".join(f"`lecture={p}`" for p in BN_PRESETS) + "."
    table = comparisons(runs, ["activation", "norm"], baselines={"activation": "sigmoid", "norm": "none"})
    simple = table[(table.kind == "simple") & (table.factor == "norm")].set_index("context")
    interaction = table[table.kind == "interaction"].iloc[0]
    term = anova(runs, ["activation", "norm"]).table.set_index("term").loc["activation x norm"]
    on_sigmoid, on_relu = simple.loc["activation=sigmoid"], simple.loc["activation=relu"]
    seeds = runs.groupby(["activation", "norm"]).size().min()
    if interaction.p_holm < 0.05:
        answer = "Yes." if interaction.diff_pp < 0 else "No, it helps ReLU more."
    elif interaction.tost_p < 0.05:
        answer = "No: it helps both about equally."
    else:
        answer = "Not resolved by these seeds."
    return "\n".join([
        f"**Does Batch Normalization help sigmoid more than ReLU?** {answer} Over {seeds} seeds per model "
        f"(10 epochs, 1024-300, SGD lr 0.1), Batch Normalization changes the test accuracy of the "
        f"sigmoid network by {_interval(on_sigmoid)} and of the ReLU network by {_interval(on_relu)} "
        f"(paired by seed). The interaction, ReLU's gain minus sigmoid's, is {_interval(interaction)}; "
        f"in the two-way ANOVA the activation x norm term has F = {term.F:.1f}, p = {term.p:.2g}, "
        f"partial eta-squared {term.partial_eta_sq:.2f}.",
        "",
        f"- Batch Normalization on sigmoid: {on_sigmoid.verdict}.",
        f"- Batch Normalization on ReLU: {on_relu.verdict}.",
        f"- The interaction: {interaction.verdict}.",
    ])


def dropout_question(without: pd.DataFrame, with_dropout: pd.DataFrame) -> str:
    """Does Dropout (p 0.2) help the lecture's 165-165 MLP? `mlp` runs without and with it."""
    runs = pd.concat([without, with_dropout])
    if min(len(without), len(with_dropout)) < 2:
        return "Not answered: it needs at least 2 seeds of `lecture=mlp` and of `lecture=mlp dropout=lecture`."
    row = comparisons(runs, ["dropout"], baselines={"dropout": "0"}).iloc[0]
    if row.p_holm < 0.05:
        answer = "Yes." if row.diff_pp > 0 else "No, it hurts."
    elif row.tost_p < 0.05:
        answer = f"No: with and without it the MLP is equivalent within ±{MARGIN_PP:g} pp."
    else:
        answer = "Not resolved by these seeds."
    return "\n".join([
        f"**Does Dropout help the 165-165 MLP?** {answer} Dropout 0.2 after each hidden block of the lecture's MLP "
        f"(784-165-165-10, ReLU, 25 epochs, no Batch Normalization) changes its test accuracy by "
        f"{_interval(row)} over {row.n_pairs} seeds paired by seed (Welch: [{row.welch_low_pp:+.2f}, "
        f"{row.welch_high_pp:+.2f}]; P(a run with Dropout beats one without) = {row.poi:.2f}); "
        f"the smallest difference these seeds resolve at 80% power is {row.mdd_pp:.2f} pp.",
        "",
        f"- Verdict: {row.verdict}.",
    ])


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


def preset_runs(finished: pd.DataFrame, preset: str, *overrides: str) -> pd.DataFrame:
    """The finished runs of a lecture preset (with `overrides`), matched by their axes."""
    wanted = preset_axes(preset, *overrides)
    return finished[(finished[list(wanted)] == list(wanted.values())).all(axis=1)]


def results_table(sweep: Sweep) -> str:
    rows = []
    finished = sweep.finished
    for model in LECTURE:
        accs = preset_runs(finished, model.preset).test_acc.tolist()
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
    parser.add_argument("--dropout-sweep", help="the sweep of `lecture=mlp dropout=lecture` for the Dropout question")
    parser.add_argument("--experiment", default="mlpsweep")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--doc", type=Path, default=CONFIG_DIR.parent / "docs" / "lecture.md")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as the report: no bar per histogram
    try:
        if not args.doc.is_file():
            raise ReportError(f"--doc={str(args.doc)!r}: must be the lecture document to rewrite, and it is not a file")
        sweep = open_sweep(args.tracking_uri, args.experiment, args.sweep)[1]
        dropout = open_sweep(args.tracking_uri, args.experiment, args.dropout_sweep)[1] if args.dropout_sweep else None
        if not any(len(preset_runs(sweep.finished, model.preset)) for model in LECTURE):
            raise ReportError(
                f"--sweep={sweep.name!r}: must be a sweep of the lecture's presets (e.g. experiment=lecture/all), "
                f"and none of its {len(sweep.finished)} finished runs is one; {args.doc} is left as it is"
            )
    except ReportError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    blocks = {(BEGIN, END): f"Sweep `{sweep.name}` ({len(sweep.finished)} finished runs):\n\n{results_table(sweep)}"}
    questions = [batchnorm_question(sweep.finished)]
    if dropout is not None:
        with_dropout = preset_runs(dropout.finished, "mlp", "dropout=lecture")
        questions.append(dropout_question(preset_runs(sweep.finished, "mlp"), with_dropout))
    blocks[QUESTIONS_BEGIN, QUESTIONS_END] = "\n\n".join(questions)
    text = args.doc.read_text()
    for (begin, end), body in blocks.items():
        block = f"{begin}\n{body}\n{end}"
        text = re.sub(f"{re.escape(begin)}.*{re.escape(end)}", lambda _, block=block: block, text, flags=re.S)
        print(block)
    args.doc.write_text(text)


if __name__ == "__main__":
    main()
