"""The report as a document: Markdown with linked figures, a self-contained HTML page, and its tables
as CSV files (runs, cells, anova, effects), written to one folder and logged to the sweep's parent run."""

from __future__ import annotations

import base64
import html
import itertools
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from mlpsweep.report import analysis, figures
from mlpsweep.report.collect import ReportError, Sweep
from mlpsweep.tracking import ERROR_TAG, OVERRIDES_TAG

# the longest name of a file or folder the report writes (ASCII: well under any file system's limit)
MAX_NAME = 100
CSV_FILES = {
    "runs.csv": "every run: status, axes, seed and final numbers",
    "cells.csv": "every config: n, seeds, mean, std and 95% t-interval of test accuracy over seeds",
    "anova.csv": "the factorial ANOVA of test accuracy (pp): df, sum of squares, F, p, partial eta-squared, Holm p",
    "effects.csv": "every comparison: difference (pp), Welch, paired and bootstrap intervals, Cohen's d, "
    "P(A > B), detectable difference, seeds needed, TOST p, Holm p and verdict",
}


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2

    def markdown(self) -> str:
        return f"{'#' * self.level} {self.text}"

    def html(self) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class Text:
    text: str

    def markdown(self) -> str:
        return self.text

    def html(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]

    def markdown(self) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def html(self) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in self.items) + "</ul>"


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame

    def markdown(self) -> str:
        return markdown_table(self.frame)

    def html(self) -> str:
        frame = self.frame.rename_axis(columns=None)  # a named header row would add an empty first column
        table = frame.to_html(index=False, float_format=_fmt, na_rep="", border=0, classes="t")
        return f'<div class="wide">{table}</div>'


@dataclass(frozen=True)
class Links:
    items: tuple[tuple[str, str], ...]  # (text, path relative to the report)

    def markdown(self) -> str:
        return "\n".join(f"- [{text}]({link})" for text, link in self.items)

    def html(self) -> str:
        return "<ul>" + "".join(f'<li><a href="{html.escape(link)}">{html.escape(text)}</a></li>' for text, link in self.items) + "</ul>"


@dataclass(frozen=True)
class Image:
    path: Path  # the PNG file
    link: str  # its path relative to report.md
    caption: str

    def markdown(self) -> str:
        return f"![{self.caption}]({self.link})\n\n*{self.caption}*"

    def html(self) -> str:
        data = base64.b64encode(self.path.read_bytes()).decode()
        caption = html.escape(self.caption)
        return f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table.t{border-collapse:collapse;font-size:13px;margin:1em 0}"
    "table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}"
    "div.wide{overflow-x:auto}"
    "table.t th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555;font-size:13px}"
)


@dataclass
class Document:
    """Blocks rendered both as Markdown (figures linked) and as self-contained HTML (embedded)."""

    out: Path
    blocks: list[Heading | Text | Bullets | Table | Links | Image] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(text, level))

    def text(self, text: str) -> None:
        self.blocks.append(Text(text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(Bullets(tuple(items)))

    def links(self, items: Sequence[tuple[str, str]]) -> None:
        self.blocks.append(Links(tuple(items)))

    def table(self, frame: pd.DataFrame, index: bool = False) -> None:
        self.blocks.append(Table(frame.reset_index() if index else frame))

    def figure(self, fig: Figure | None, name: str, caption: str) -> None:
        if fig is None:
            return
        path = self.out / "figures" / f"{safe_name(name, 'figure')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        self.blocks.append(Image(path, path.relative_to(self.out).as_posix(), caption))

    def markdown(self) -> str:
        return "\n\n".join(block.markdown() for block in self.blocks) + "\n"

    def html(self, title: str) -> str:
        body = "\n".join(block.html() for block in self.blocks)
        return (
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
        )


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else _fmt(value)
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


@dataclass
class Tables:
    """Everything the report computes from the finished runs (see analysis)."""

    cells: pd.DataFrame
    anova: analysis.Anova
    comparisons: pd.DataFrame
    resolution: analysis.Resolution
    importances: tuple[pd.DataFrame, str] | None  # only for searches, not grids
    margin_pp: float


def analyse(sweep: Sweep, baselines: dict[str, str], margin_pp: float = analysis.MARGIN_PP) -> Tables:
    finished = sweep.finished
    factors = list(sweep.axes)
    found = analysis.anova(finished, factors)
    compared = analysis.comparisons(finished, factors, baselines=baselines, margin_pp=margin_pp)
    anova_table, compared = analysis.holm_across(found.table, compared, margin_pp)
    # parameter importances for searches, which cover at most half of the grid their values span
    search = analysis.grid_coverage(finished, analysis.varying(finished, factors)) <= 0.5
    return Tables(
        analysis.cells(finished, factors),
        analysis.Anova(anova_table, found.note, found.typ),
        compared,
        analysis.resolution(finished, factors),
        analysis.importances(finished, factors) if search else None,
        margin_pp,
    )


def comparison_sentence(row) -> str:
    """One comparison: the difference with its Welch interval, then the paired and bootstrap intervals,
    Cohen's d, P(A > B) and the verdict."""
    if row.kind == "simple":
        text = f"{row.level} vs {row.baseline}{f', with {row.context}' if row.context else ''}: {row.diff_pp:+.1f} pp"
    elif row.kind == "main":
        text = f"{row.a} vs {row.b} ({row.context}): {row.diff_pp:+.2f} pp"
    else:
        text = f"({row.a}) - ({row.b}){f' ({row.context})' if row.context else ''}: {row.diff_pp:+.2f} pp"
    if not np.isfinite(row.welch_low_pp):
        return text + f" (n = {row.n_a} vs {row.n_b}: no interval without repeated seeds)"
    text += f" [{row.welch_low_pp:.1f}, {row.welch_high_pp:.1f}] (Welch)"
    if np.isfinite(row.paired_low_pp):
        text += f", paired over {row.n_pairs} seeds [{row.paired_low_pp:.2f}, {row.paired_high_pp:.2f}]"
    if np.isfinite(row.boot_low_pp):
        text += f", bootstrap {row.boot_method} [{row.boot_low_pp:.2f}, {row.boot_high_pp:.2f}]"
    if np.isfinite(row.cohens_d):
        text += f", d = {row.cohens_d:.2f}"
    if np.isfinite(row.poi):
        interval = f" [{row.poi_low:.2f}, {row.poi_high:.2f}]" if np.isfinite(row.poi_low) else ""
        text += f", P(A > B) = {row.poi:.2f}{interval}"
    return f"{text} - {row.verdict}"


def _method_text(tables: Tables, sweep: Sweep) -> str:
    compared, anova_terms = tables.comparisons, int((tables.anova.table.term != "residual").sum())
    res = tables.resolution
    text = (
        "Differences of mean test accuracy in percentage points (pp). Beside each difference: its 95% Welch "
        "t-interval; where the configs share seeds, the paired interval (seed k of one config against seed k of "
        "the other: the same split and batch order; for an average over other axes, seed k's average over the "
        "same settings, so every seed is paired across the same configs); a bootstrap interval (scipy.stats."
        f"bootstrap, {analysis.N_RESAMPLES} resamples from seed {analysis.RNG_SEED}, BCa, or percentile where BCa "
        "gives none, as named); Cohen's d (difference over the pooled SD of the configs involved); and "
        "P(A > B), the probability that a run of A beats a run of B in the same setting (Mann-Whitney U over "
        f"nA nB, ties one half). Significance is judged by Holm's correction across all {len(compared) + anova_terms} "
        f"tests of this report ({anova_terms} ANOVA terms and {len(compared)} comparisons, paired tests where there "
        f"are pairs) at the 5% level. A difference that is not significant is called equivalent within ±"
        f"{tables.margin_pp:g} pp when two one-sided tests (TOST, 5% each) reject a larger difference, and "
        "otherwise not resolved, with the seeds per config that would detect the larger of the observed "
        "difference and the margin with 80% power (before the correction for multiple tests)."
    )
    if np.isfinite(res.sd_pp):
        text += (
            f" The pooled seed-to-seed SD is {res.sd_pp:.3f} pp ({res.df} df): with {res.seeds} seeds per config this "
            f"sweep detects a difference of {res.mdd_pp:.2f} pp between two configs with 80% power at the 5% level."
        )
    if not sweep.has_seeds or res.seeds < 3:
        text += (
            " With fewer than 3 seeds per config, n is too small for these intervals, the bootstrap and P(A > B) "
            "to mean much: treat them as rough."
        )
    return text


def build_report(client: MlflowClient, sweep: Sweep, out: Path, tables: Tables) -> Document:
    doc = Document(out)
    finished, failed = sweep.finished, sweep.failed
    doc.heading(f"Sweep {sweep.name}", level=1)
    overrides = sweep.parent.data.tags.get(OVERRIDES_TAG, "")
    stopped = int(failed.status.isin(["KILLED", "RUNNING"]).sum())
    doc.text(
        f"Parent run {sweep.parent.info.run_id}, overrides `{overrides}`: {len(sweep.runs)} runs, "
        f"{len(finished)} finished, {len(failed) - stopped + len(sweep.failed_jobs)} failed"
        + (f", {stopped} stopped before they finished (KILLED, or left RUNNING)" if stopped else "")
        + f". Swept axes: {', '.join(sweep.axes) or 'none'}"
        + ("; configs repeat over seeds, so numbers are mean ± std over seeds [95% t-interval]." if sweep.has_seeds else ".")
    )
    if (status := sweep.parent.info.status) != "FINISHED":
        why = sweep.parent.data.tags.get(ERROR_TAG)
        doc.text(
            f"The sweep did not finish: its parent run is {status}" + (f" ({why})" if why else "")
            + ". What follows covers the runs that finished; `resume=true` on the sweep's command runs the rest."
        )
    if finished.empty:
        doc.text("No run of this sweep finished, so there is nothing to compare.")
    else:
        doc.heading("Leaderboard")
        doc.table(analysis.leaderboard(sweep))
        if sweep.has_seeds:
            doc.heading("Configs over seeds")
            doc.table(analysis.config_summary(sweep))
        if len(sweep.axes) >= 2:
            doc.heading("Test accuracy by pairs of axes")
            for rows, columns in itertools.combinations(sweep.axes, 2):
                doc.text(f"{rows} x {columns}:")
                doc.table(analysis.pivot(sweep, rows, columns), index=True)
        if sweep.axes:
            _factorial_sections(doc, sweep, tables)
        _curves_and_insides(client, doc, sweep)
    doc.heading("Data")
    doc.text("The report's tables as CSV files, beside this report:")
    doc.links([(f"{name}: {what}", name) for name, what in CSV_FILES.items()])
    doc.heading("Runs that did not finish")
    failures = [f"{r.run_name} ({r.status}) [{r.overrides}]: {r.error or 'no error recorded'}" for r in failed.itertuples()]
    doc.bullets(failures + sweep.failed_jobs or ["none"])
    return doc


def _factorial_sections(doc: Document, sweep: Sweep, tables: Tables) -> None:
    finished, axes = sweep.finished, sweep.axes
    doc.heading("Factorial analysis")
    doc.text(tables.anova.note)
    if not tables.anova.table.empty:
        doc.table(tables.anova.table)
        doc.text("p_holm: Holm-adjusted over every test of this report (see Effects). partial_eta_sq: "
                 "SS_term / (SS_term + SS_residual).")  # fmt: skip
    used = analysis.varying(finished, axes)
    doc.figure(figures.main_effects_figure(finished, used), "main_effects", "main effects: mean test accuracy per level, 95% t-interval")
    for first, second in itertools.combinations(used if tables.importances is None else [], 2):  # grids only
        doc.figure(figures.interaction_figure(finished, first, second), f"interaction_{first}_{second}",
                   f"interaction {first} x {second}: mean test accuracy with 95% t-intervals, one line per {second}")  # fmt: skip
    if tables.importances is not None:
        table, note = tables.importances
        doc.heading("Parameter importances")
        doc.text(note)
        if not table.empty:
            doc.table(table)
            doc.figure(figures.importance_figure(table), "importances", "parameter importances")
    doc.heading("Effects")
    doc.text(_method_text(tables, sweep))
    compared = tables.comparisons
    for kind, title in (("simple", "Each value against its axis's baseline, within each setting of the other axes:"),
                        ("main", "Averaged over the other axes:"),
                        ("interaction", "Interactions (how much an effect changes with another axis):")):  # fmt: skip
        rows = compared[compared.kind == kind]
        if len(rows) or kind == "simple":
            doc.text(title)
            doc.bullets([comparison_sentence(r) for r in rows.itertuples()] or ["no pair of configs to compare"])
    for axis in axes:
        doc.figure(figures.marginal_figure(sweep, axis), f"marginal_{axis}", f"test accuracy by {axis}")


def _curves_and_insides(client: MlflowClient, doc: Document, sweep: Sweep) -> None:
    doc.heading("Learning curves")
    doc.figure(figures.learning_curves_figure(sweep), "learning_curves",
               "validation accuracy and loss per config: mean over seeds with a 95% t-band")  # fmt: skip
    doc.heading("Generalization gap")
    doc.figure(figures.gap_figure(sweep), "generalization_gap", "final train - validation accuracy per run")
    doc.heading("Inside the networks")
    doc.figure(figures.histograms_figure(sweep), "activation_histograms", "activation input/output histograms per layer")
    doc.figure(figures.health_figure(sweep), "probe_health",
               "saturated (sigmoid/tanh) or dead (ReLU-like) fraction per layer over epochs: mean over seeds, 95% t-band")  # fmt: skip
    for axis in analysis.varying(sweep.finished, sweep.axes):
        doc.figure(figures.health_by_level_figure(sweep, axis), f"probe_health_by_{axis}",
                   f"saturated or dead fraction per layer at the last epoch by {axis}, 95% t-interval")  # fmt: skip
    doc.figure(figures.grad_norm_figure(sweep), "gradient_norms", "gradient norm per hidden layer at the last epoch per config")
    if not any(sweep.histograms.values()):
        doc.text("These runs have no probe data (trained with probe.enabled=false).")
    confusion = figures.best_confusion_figure(client, sweep)
    if confusion:
        doc.heading("Confusion matrix of the best run")
        doc.figure(confusion[0], "confusion_best", f"test confusion matrix of {confusion[1]}")


def safe_name(text: str, fallback: str) -> str:
    """`text` as a name that is never a path: ASCII letters, digits, '.', '_' and '-' (anything
    else becomes '_'), no leading or trailing dots or dashes ('.' and '..' become nothing), at
    most MAX_NAME characters; `fallback` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:MAX_NAME].strip("._-") or fallback


REPORT_FILES = ("report.md", "report.html", *CSV_FILES)
OWNER_FILE = ".sweep_run_id"  # in a report's folder: the parent run whose report it holds


def report_folder(out_root: Path, sweep: Sweep) -> Path:
    """The sweep's folder in out_root, made ready: out_root/<sweep name> (a safe name, else the run
    id), or, where that folder holds anything but this sweep's report (another sweep's, whose name
    differs in characters a safe name drops, e.g. `a/b` and `a b`; a folder of the user's),
    out_root/<name>-<run id>. An earlier report of this sweep there is cleared (its figures may not
    all be drawn again); nothing else is ever removed."""
    run_id = sweep.parent.info.run_id
    name = safe_name(sweep.name or "", run_id)

    def owner(folder: Path) -> str | None:
        return (folder / OWNER_FILE).read_text().strip() if (folder / OWNER_FILE).is_file() else None

    out = out_root / name
    if out.is_dir() and owner(out) != run_id and any(out.iterdir()):
        out = out_root / f"{name}-{run_id}"
    if not out.resolve().is_relative_to(out_root.resolve()):  # out_root/<name> is a link that leads elsewhere
        raise ReportError(f"--out={str(out_root)!r}: must be a folder the report stays in, and {out} leads outside it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if owner(out) == run_id:
            for file in REPORT_FILES:
                (out / file).unlink(missing_ok=True)
            shutil.rmtree(out / "figures", ignore_errors=True)
        (out / OWNER_FILE).write_text(run_id)
    except OSError as err:
        raise ReportError(f"--out={str(out_root)!r}: must be a folder the report can be written in ({err})") from None
    return out


def write_report(
    client: MlflowClient, sweep: Sweep, out_root: Path, baselines: dict[str, str], margin_pp: float = analysis.MARGIN_PP
) -> Path:
    """Write the report files to the sweep's folder in out_root (`report_folder`) and log them, and
    nothing else of that folder, to the parent run."""
    out = report_folder(out_root, sweep)
    tables = analyse(sweep, baselines, margin_pp)
    doc = build_report(client, sweep, out, tables)
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"Sweep {sweep.name}"))
    sweep.runs.drop(columns=["config", "label"], errors="ignore").to_csv(out / "runs.csv", index=False)
    tables.cells.to_csv(out / "cells.csv", index=False)
    tables.anova.table.to_csv(out / "anova.csv", index=False)
    tables.comparisons.drop(columns=["cells"]).to_csv(out / "effects.csv", index=False)
    run_id = sweep.parent.info.run_id
    for file in REPORT_FILES:
        client.log_artifact(run_id, str(out / file), artifact_path="report")
    if (out / "figures").is_dir():
        client.log_artifacts(run_id, str(out / "figures"), artifact_path="report/figures")
    return out
