"""The report: seed statistics checked by hand on a store with known values, and a real sweep end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from conftest import REAL_SWEEP_GROUP, REPO_ROOT, free_port, sqlite_uri
from mlflow.tracking import MlflowClient

from mlpsweep.engine import metric_key
from mlpsweep.report import (
    MAX_NAME,
    ReportError,
    config_summary,
    effect_sentence,
    effects,
    find_sweep,
    load_sweep,
    main,
    pivot,
    safe_name,
    write_report,
)
from mlpsweep.report.analysis import AXES
from mlpsweep.report.collect import swept_axes
from mlpsweep.report.document import REPORT_FILES
from mlpsweep.stats import summarize, welch_difference
from mlpsweep.tracking import (
    CONFIG_HASH_TAG,
    ERROR_TAG,
    FAILED_JOB_TAG_PREFIX,
    OVERRIDES_TAG,
    ROLE_TAG,
    get_or_create_experiment,
)

# test accuracy by (activation, norm) over seeds 0, 1, 2
KNOWN = {
    ("sigmoid", "none"): [0.90, 0.91, 0.92],
    ("sigmoid", "batchnorm"): [0.95, 0.96, 0.97],
    ("relu", "none"): [0.970, 0.975, 0.980],
    ("relu", "batchnorm"): [0.972, 0.977, 0.982],
}


def fill_store(tmp_path: Path, stored_as: Callable[[str], str] = metric_key) -> MlflowClient:
    """A sweep of 12 finished runs with the KNOWN accuracies, one diverged run and one pre-run failure,
    its metrics stored under `stored_as(name)` (str: the names of a store written before the MLflow keys)."""
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment_id = get_or_create_experiment(client, "mlpsweep")
    parent = client.create_run(experiment_id, run_name="known-sweep", tags={ROLE_TAG: "sweep"})
    parent_id = parent.info.run_id
    client.set_tag(parent_id, f"{FAILED_JOB_TAG_PREFIX}13", "[dropout.p=1.5] ConfigError: dropout.p=1.5: must be a probability in [0, 1)")

    def child(name: str, activation: str, norm: str, seed: int, status: str) -> str:
        run = client.create_run(experiment_id, run_name=name, tags={ROLE_TAG: "job", "mlflow.parentRunId": parent_id})
        params = {"activation": activation, "norm": norm, "dropout": "0", "depth": "1024x300", "seed": str(seed), "num_params": "1000"}
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    for (activation, norm), accs in KNOWN.items():
        for seed, acc in enumerate(accs):
            run_id = child(f"{activation}-{norm}-s{seed}", activation, norm, seed, "FINISHED")
            for epoch, val_acc in enumerate([acc - 0.02, acc - 0.01], start=1):
                for name, value in (("val_acc", val_acc), ("train_acc", val_acc + 0.01), ("val_loss", 0.3), ("train_loss", 0.2), ("epoch_time_s", 2.0)):
                    client.log_metric(run_id, stored_as(name), value, step=epoch)
            client.log_metric(run_id, stored_as("test_acc"), acc)
            client.log_metric(run_id, stored_as("test_loss"), 1 - acc)
            client.set_terminated(run_id, "FINISHED")
    diverged = child("relu-none-lr-huge", "relu", "none", 3, "FAILED")
    client.set_tag(diverged, ERROR_TAG, "DivergenceError: loss diverged to nan at epoch 1, step 7")
    client.set_tag(diverged, OVERRIDES_TAG, "optimizer.lr=1e30")  # a job that fails in its run tags the parent too
    client.set_tag(parent_id, f"{FAILED_JOB_TAG_PREFIX}12", "[optimizer.lr=1e30] DivergenceError: loss diverged to nan")
    client.set_terminated(diverged, "FAILED")
    client.set_terminated(parent_id, "FAILED")
    return client


@pytest.fixture
def known_sweep(tmp_path: Path):
    client = fill_store(tmp_path)
    return client, load_sweep(client, find_sweep(client, client.get_experiment_by_name("mlpsweep").experiment_id, None))


def test_summaries_match_numbers_computed_by_hand() -> None:
    # mean 0.91, s = 0.01, t(0.975, 2) = 4.302653 -> half width 4.302653 * 0.01 / sqrt(3) = 0.024841
    summary = summarize([0.90, 0.91, 0.92])
    assert (summary.n, summary.mean, summary.std) == (3, pytest.approx(0.91), pytest.approx(0.01))
    assert (summary.low, summary.high) == (pytest.approx(0.885159, abs=1e-6), pytest.approx(0.934841, abs=1e-6))
    # equal variances and sizes: Welch df = 4, se = sqrt(2 * 0.01^2 / 3) = 0.0081650, t(0.975, 4) = 2.776445
    diff = welch_difference([0.95, 0.96, 0.97], [0.90, 0.91, 0.92])
    assert diff.estimate == pytest.approx(0.05)
    assert (diff.low, diff.high) == (pytest.approx(0.027330, abs=1e-6), pytest.approx(0.072670, abs=1e-6))
    assert not diff.includes_zero
    # unequal variances: s_b^2 = 0.00045, se^2 = 0.0001/3 + 0.00045/2 = 2.58333e-4 (se 0.0160728),
    # df = se^4 / ((0.0001/3)^2 / 2 + (0.00045/2)^2 / 1) = 1.30393, t(0.975, 1.30393) = 7.4623
    uneven = welch_difference([0.90, 0.91, 0.92], [0.88, 0.91])
    assert uneven.estimate == pytest.approx(0.015)
    assert uneven.high - uneven.estimate == pytest.approx(7.4623 * 0.0160728, rel=1e-4)


def test_seed_aggregation_and_effects_of_a_known_store(known_sweep) -> None:
    _, sweep = known_sweep
    assert sweep.axes == ["activation", "norm"] and sweep.has_seeds
    # runs logged before the init and scheduler axes existed: what they trained with, one level each
    assert set(sweep.runs.init) == {"default"} and set(sweep.runs.scheduler) == {"none"}
    assert len(sweep.runs) == 13 and len(sweep.finished) == 12

    summary = config_summary(sweep).set_index("config")
    assert summary.loc["activation=sigmoid, norm=none", "n"] == 3  # a config named by its axes
    assert summary.loc["activation=sigmoid, norm=none", "test_acc"] == "0.9100 ± 0.0100 [0.8852, 0.9348]"

    found = {(e["axis"], e["value"], e["context"]): e for e in effects(sweep, baselines={})}
    bn_sigmoid = found[("norm", "batchnorm", "activation=sigmoid")]
    assert (bn_sigmoid["effect_pp"], bn_sigmoid["low_pp"], bn_sigmoid["high_pp"]) == (
        pytest.approx(5.0), pytest.approx(2.7330, abs=1e-4), pytest.approx(7.2670, abs=1e-4)
    )
    assert effect_sentence(bn_sigmoid) == "batchnorm vs none, with activation=sigmoid: +5.0 pp [2.7, 7.3]"
    # relu: +0.2 pp, s = 0.005 each, half width 2.776445 * sqrt(2 * 0.005^2 / 3) = 1.13 pp
    bn_relu = found[("norm", "batchnorm", "activation=relu")]
    assert bn_relu["includes_zero"] and bn_relu["low_pp"] == pytest.approx(-0.9335, abs=1e-4)
    assert effect_sentence(bn_relu).endswith("includes zero: not distinguishable from seed noise")
    relu_vs_sigmoid = found[("activation", "relu", "norm=none")]
    assert relu_vs_sigmoid["effect_pp"] == pytest.approx(6.5) and relu_vs_sigmoid["baseline"] == "sigmoid"

    table = pivot(sweep, "activation", "norm")
    assert table.shape == (2, 2) and list(table.index) == ["sigmoid", "relu"] and list(table.columns) == ["none", "batchnorm"]
    assert table.loc["sigmoid", "batchnorm"] == "0.9600 ± 0.0100"


def test_report_files_of_a_known_store(known_sweep, tmp_path: Path) -> None:
    client, sweep = known_sweep
    out = write_report(client, sweep, tmp_path / "reports", baselines={"activation": "relu"})
    assert out == tmp_path / "reports" / "known-sweep"
    markdown = (out / "report.md").read_text()
    assert "sigmoid vs relu, with norm=none: -6.5 pp" in markdown  # the baseline option
    assert "relu-none-lr-huge (FAILED)" in markdown and "loss diverged to nan at epoch 1, step 7" in markdown
    assert "job 13: [dropout.p=1.5] ConfigError" in markdown
    assert "13 runs, 12 finished, 2 failed." in markdown and "job 12:" not in markdown  # the diverged run once
    assert "The sweep did not finish: its parent run is FAILED." in markdown
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 13
    logged = {a.path for a in client.list_artifacts(sweep.parent.info.run_id, "report")}
    assert {f"report/{name}" for name in ("report.md", "report.html", "runs.csv", "cells.csv", "anova.csv", "effects.csv")} <= logged
    assert_tables_agree(out, runs)
    # the ANOVA by hand (pp): interaction contrast (96 - 91) - (97.7 - 97.5) = 4.8, SS = 3 * 4.8^2 / 4 = 17.28;
    # residual SS = 2 * 2 * 1^2 + 2 * 2 * 0.5^2 = 5 on 8 df, so F = 17.28 / (5 / 8) = 27.648
    anova = pd.read_csv(out / "anova.csv").set_index("term")
    assert anova.loc["activation x norm", "F"] == pytest.approx(27.648) and anova.loc["residual", "df"] == 8
    assert "Type II sums of squares" in markdown and "(activation=sigmoid vs relu at norm=batchnorm)" in markdown
    assert (out / "figures" / "interaction_activation_norm.png").is_file()
    assert "Holm's correction across all 10 tests of this report (3 ANOVA terms and 7 comparisons" in markdown


def assert_tables_agree(out: Path, runs: pd.DataFrame) -> None:
    """cells.csv holds each config's finished runs of runs.csv, effects.csv compares those configs with
    those n, and the report links every CSV."""
    finished = runs[runs.status == "FINISHED"].dropna(subset=["test_acc"])
    cells, effects = pd.read_csv(out / "cells.csv"), pd.read_csv(out / "effects.csv")
    assert cells.n.sum() == len(finished)
    factors = [c for c in cells.columns if c in finished.columns and c != "seed"]
    means = finished.groupby(factors).test_acc.mean()
    for row in cells.to_dict("records"):
        assert row["mean"] == pytest.approx(means[tuple(row[f] for f in factors)])
    n_of = dict(zip(cells.config, cells.n))
    simple = effects[effects.kind == "simple"]
    assert len(simple) and all(r.n_a == n_of[r.cells_a] and r.n_b == n_of[r.cells_b] for r in simple.itertuples())
    assert effects.p_holm.dropna().ge(effects.p.dropna() - 1e-12).all() and effects.verdict.notna().all()
    page, markdown = (out / "report.html").read_text(), (out / "report.md").read_text()
    for name in ("runs.csv", "cells.csv", "anova.csv", "effects.csv"):
        assert f'href="{name}"' in page and f"]({name})" in markdown


def test_a_store_with_the_old_metric_names_reads_the_same(known_sweep, tmp_path: Path) -> None:
    _, sweep = known_sweep
    (tmp_path / "old").mkdir()
    client = fill_store(tmp_path / "old", stored_as=str)  # train_loss, val_acc, test_acc, ... as before loss/train, ...
    old = load_sweep(client, find_sweep(client, client.get_experiment_by_name("mlpsweep").experiment_id, None))
    numbers = ["run_name", "test_acc", "test_loss", "best_val_acc", "best_epoch", "epochs", "train_val_gap", "s_per_epoch"]
    pd.testing.assert_frame_equal(old.runs[numbers], sweep.runs[numbers])
    assert sweep.runs.test_acc.notna().sum() == 12
    for before, now in zip(old.runs.run_id, sweep.runs.run_id):
        pd.testing.assert_frame_equal(old.histories[before], sweep.histories[now])


def test_a_sweep_of_one_run(tmp_path: Path) -> None:
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment_id = get_or_create_experiment(client, "mlpsweep")
    parent = client.create_run(experiment_id, run_name="single", tags={ROLE_TAG: "sweep"})
    run = client.create_run(experiment_id, run_name="relu-none-p0-64-s0", tags={"mlflow.parentRunId": parent.info.run_id})
    for key, value in {"activation": "relu", "norm": "none", "dropout": "0", "depth": "64", "seed": "0"}.items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "accuracy/val", 0.9, step=1)
    client.log_metric(run.info.run_id, "accuracy/test", 0.91)
    client.set_terminated(run.info.run_id)
    sweep = load_sweep(client, find_sweep(client, experiment_id, "single"))
    out = write_report(client, sweep, tmp_path / "reports", baselines={})
    assert "Swept axes: none" in (out / "report.md").read_text()
    assert (out / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.xdist_group(REAL_SWEEP_GROUP)
def test_report_of_a_real_sweep(real_sweep: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    store, trained = real_sweep
    assert trained.returncode == 1, trained.stderr[-3000:]  # the lr=1e30 jobs diverge

    report = [sys.executable, str(REPO_ROOT / "report.py"), "--tracking-uri", sqlite_uri(store), "--out", str(tmp_path / "reports")]
    result = subprocess.run(report, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "reports" / "real-sweep"
    assert {p.name for p in out.iterdir()} == {*REPORT_FILES, "figures", ".sweep_run_id"}
    assert {p.stem for p in (out / "figures").iterdir()} >= {
        "marginal_activation", "marginal_norm", "learning_curves", "generalization_gap", "activation_histograms",
        "probe_health", "confusion_best", "main_effects", "interaction_activation_norm", "probe_health_by_activation",
    }  # fmt: skip
    runs = pd.read_csv(out / "runs.csv")
    failed = runs[runs.status == "FAILED"]
    assert len(runs) == 16 and len(failed) >= 4  # every relu run with lr=1e30 diverges (sigmoid may saturate instead)
    assert_tables_agree(out, runs)
    anova = pd.read_csv(out / "anova.csv")
    if pd.read_csv(out / "cells.csv").n.min() >= 2:  # unless a diverging sigmoid config kept one seed
        assert {"activation", "norm", "residual"} <= set(anova.term) and anova.F.notna().any()
    else:
        assert anova.empty and "No ANOVA: it needs at least 2 seeds of every config" in (out / "report.md").read_text()

    markdown = (out / "report.md").read_text()
    pivot_rows = re.search(r"activation x norm:\n\n((?:\|.*\n)+)", markdown).group(1).strip().splitlines()
    assert pivot_rows[0] == "| activation | none | batchnorm |" and len(pivot_rows) == 2 + 2
    assert re.search(r"batchnorm vs none, with activation=sigmoid[^:\n]*: [+-]\d+\.\d pp \[-?\d+\.\d, -?\d+\.\d\]", markdown)
    listed = re.findall(r"^- (\S+) \(FAILED\) \[.*optimizer\.lr=1e\+30.*\]: DivergenceError: loss diverged", markdown, re.M)
    assert sorted(listed) == sorted(failed.run_name)

    page = (out / "report.html").read_text()
    assert page.count("<img src=\"data:image/png;base64,") == len(list((out / "figures").iterdir())) and "figures/" not in page


# --- bad arguments: one line, exit status 2, nothing written (no report folder, no store) -------------

MISSING_STORE = "must be an existing MLflow store, and"


def report_fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the report's main with `argv`; it must exit with status 2 and one line on stderr, which is returned."""
    capsys.readouterr()  # what came before, e.g. MLflow creating the store of fill_store
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err.strip()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--baseline", "dropout"], "--baseline='dropout': must be AXIS=VALUE, e.g. norm=none"),
        (["--baseline", "=relu"], "--baseline='=relu': must be AXIS=VALUE, e.g. norm=none"),
        (["--baseline", "activation=nonexistent"],
         "--baseline='activation=nonexistent': must be a value this sweep has for activation: sigmoid, relu"),
        (["--baseline", "color=red"],
         "--baseline='color=red': must name one of the report's axes: activation, norm, dropout, depth"),
        (["--sweep", "no-such-sweep"],
         "--sweep='no-such-sweep': must be the name or run id of a sweep of this experiment, e.g. known-sweep"),
        (["--experiment", "nope"], "--experiment='nope': must be an experiment of sqlite:///"),
    ],
)  # fmt: skip
def test_bad_report_arguments(
    arguments: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_store(tmp_path)
    out = tmp_path / "reports"
    line = report_fails(["--tracking-uri", sqlite_uri(tmp_path), "--out", str(out), *arguments], capsys)
    assert f"error: {message}" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("store", "path"),
    [
        ("sqlite:///{tmp}/no/mlflow.db", "{tmp}/no/mlflow.db"),
        ("sqlite:///{tmp}/mlflow.db", "{tmp}/mlflow.db"),
        ("{tmp}/mlruns", "{tmp}/mlruns"),
        ("file://{tmp}/mlruns", "{tmp}/mlruns"),
    ],
)
def test_a_missing_store_is_not_created(
    store: str, path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a folder store, where MLflow is allowed to read one
    uri = store.format(tmp=tmp_path)
    line = report_fails(["--tracking-uri", uri, "--out", str(tmp_path / "reports")], capsys)
    assert line.endswith(f"error: --tracking-uri={uri!r}: {MISSING_STORE} {path.format(tmp=tmp_path)} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_the_default_store_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    line = report_fails([], capsys)
    assert f"error: --tracking-uri='sqlite:///{tmp_path.resolve()}/mlflow.db': {MISSING_STORE}" in line
    assert list(tmp_path.iterdir()) == []


def test_an_unusable_store_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    line = report_fails(["--out", str(tmp_path / "reports")], capsys)
    allowed = "must be a sqlite:///, http(s)://, postgresql:// or mysql:// URI"
    assert line.endswith(f"error: $MLFLOW_TRACKING_URI='bogus://x': {allowed}")
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_does_not_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    line = report_fails(["--tracking-uri", uri, "--out", str(tmp_path / "reports")], capsys)
    assert f"{uri!r} (or $MLFLOW_TRACKING_URI): no MLflow server answers there" in line
    assert list(tmp_path.iterdir()) == []


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill_store(tmp_path)
    (tmp_path / "taken").write_text("")
    line = report_fails(["--tracking-uri", sqlite_uri(tmp_path), "--out", str(tmp_path / "taken")], capsys)
    assert line.endswith(f"error: --out={str(tmp_path / 'taken')!r}: must be a folder, and it is a file")


def test_a_good_baseline_through_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill_store(tmp_path)
    main(["--tracking-uri", sqlite_uri(tmp_path), "--out", str(tmp_path / "reports"), "--baseline", "norm=batchnorm"])
    markdown = (tmp_path / "reports" / "known-sweep" / "report.md").read_text()
    assert "none vs batchnorm, with activation=sigmoid: -5.0 pp" in markdown


# --- names are never paths --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "../../etc", "a/b", "/etc/passwd", "-rf", "x" * 300, "sweep\n2"])
def test_a_sweep_name_is_never_a_path(name: str, tmp_path: Path) -> None:
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment_id = get_or_create_experiment(client, "mlpsweep")
    parent = client.create_run(experiment_id, run_name=name, tags={ROLE_TAG: "sweep"})
    sweep = load_sweep(client, find_sweep(client, experiment_id, None))
    assert sweep.name == name
    out = write_report(client, sweep, tmp_path / "reports", baselines={})
    assert out.parent == tmp_path / "reports" and (out / "report.md").is_file()
    assert out.name not in ("", ".", "..") and len(out.name) <= MAX_NAME and not out.name.startswith(("-", "."))
    assert out.name == (parent.info.run_id if name in ("..", ".") else safe_name(name, "unused"))


def test_sweeps_whose_names_meet_in_one_folder_keep_their_reports_apart(tmp_path: Path) -> None:
    """`a/b` and `a b` are both `a_b` as folder names: the second report goes to a folder of its
    own, and each parent run gets its own files; a report written again clears its earlier one."""
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment_id = get_or_create_experiment(client, "mlpsweep")
    parents = [client.create_run(experiment_id, run_name=n, tags={ROLE_TAG: "sweep"}).info.run_id for n in ("a/b", "a b")]
    first = write_report(client, load_sweep(client, client.get_run(parents[0])), tmp_path / "reports", baselines={})
    (first / "figures").mkdir(exist_ok=True)
    (first / "figures" / "left_over.png").write_bytes(b"an earlier report's figure")
    (first / "notes.txt").write_text("a user's own file")
    second = write_report(client, load_sweep(client, client.get_run(parents[1])), tmp_path / "reports", baselines={})
    assert first == tmp_path / "reports" / "a_b" and second == tmp_path / "reports" / f"a_b-{parents[1]}"
    assert (first / "figures" / "left_over.png").is_file()  # another sweep's report: not touched
    assert write_report(client, load_sweep(client, client.get_run(parents[0])), tmp_path / "reports", {}) == first
    assert not (first / "figures" / "left_over.png").exists() and (first / "notes.txt").is_file()
    users = tmp_path / "mine" / "a_b"  # a folder of the user's that the sweep's name meets: left alone
    (users / "figures").mkdir(parents=True)
    (users / "figures" / "plot.png").write_bytes(b"the user's own figure")
    elsewhere = write_report(client, load_sweep(client, client.get_run(parents[0])), tmp_path / "mine", {})
    assert elsewhere == tmp_path / "mine" / f"a_b-{parents[0]}" and (users / "figures" / "plot.png").is_file()
    for parent in parents:
        logged = {a.path for a in client.list_artifacts(parent, "report")}
        assert logged == {f"report/{name}" for name in REPORT_FILES}, parent  # no notes.txt, no left-over figure


def test_a_report_folder_that_cannot_be_written_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill_store(tmp_path)
    line = report_fails(["--tracking-uri", sqlite_uri(tmp_path), "--out", "/proc/reports"], capsys)
    assert "error: --out='/proc/reports': must be a folder the report can be written in" in line


def test_an_interrupted_sweep_says_so(tmp_path: Path) -> None:
    """A KILLED run is stopped, not failed, and a sweep whose parent did not finish says so."""
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment_id = get_or_create_experiment(client, "mlpsweep")
    parent = client.create_run(experiment_id, run_name="paused", tags={ROLE_TAG: "sweep"}).info.run_id
    for status in ("KILLED", "FAILED"):
        run = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, ROLE_TAG: "job"}).info.run_id
        client.set_terminated(run, status)
    client.set_tag(parent, ERROR_TAG, "interrupted with 0 of 2 configs finished")
    client.set_terminated(parent, "KILLED")
    out = write_report(client, load_sweep(client, client.get_run(parent)), tmp_path / "reports", baselines={})
    markdown = (out / "report.md").read_text()
    assert "2 runs, 0 finished, 1 failed, 1 stopped before they finished (KILLED, or left RUNNING)." in markdown
    assert "The sweep did not finish: its parent run is KILLED (interrupted with 0 of 2 configs finished)." in markdown


def test_safe_names() -> None:
    assert [safe_name(text, "RUN") for text in ["", "..", "../../etc", "a/b", "known-sweep", "sweep 1", "x" * 300]] == [
        "RUN", "RUN", "etc", "a_b", "known-sweep", "sweep_1", "x" * MAX_NAME,
    ]  # fmt: skip


def test_a_link_out_of_the_reports_folder_is_refused(known_sweep, tmp_path: Path) -> None:
    client, sweep = known_sweep
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "known-sweep").symlink_to(elsewhere)
    with pytest.raises(ReportError, match="leads outside it"):
        write_report(client, sweep, tmp_path / "reports", baselines={})
    assert list(elsewhere.iterdir()) == []


def test_a_resumed_sweep_reports_one_run_per_config(tmp_path: Path) -> None:
    """A failed attempt that a resumed sweep reran is replaced by the rerun; an unrerun failure stays."""
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment = get_or_create_experiment(client, "mlpsweep")
    parent = client.create_run(experiment, run_name="resumed", tags={ROLE_TAG: "sweep"})
    statuses = {"a": ["FAILED", "FINISHED"], "b": ["FINISHED"], "c": ["KILLED", "FAILED"]}
    for config, attempts in statuses.items():
        for status in attempts:
            run = client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id, ROLE_TAG: "job",
                                                      CONFIG_HASH_TAG: config})  # fmt: skip
            client.set_terminated(run.info.run_id, status)
    sweep = load_sweep(client, client.get_run(parent.info.run_id))
    assert len(sweep.runs) == 3
    assert sorted(sweep.runs.status) == ["FAILED", "FINISHED", "FINISHED"]


def test_what_cannot_change_a_result_is_never_a_swept_axis() -> None:
    """A sweep resumed part way (`resume` false for some runs, true for the others) or run with
    other threads is not an experiment over those: only what defines a config is an axis."""
    runs = pd.DataFrame({axis: ["x"] * 4 for axis in AXES} | {"activation": ["relu", "tanh"] * 2})
    params = pd.DataFrame({
        "resume": ["False", "False", "True", "True"],
        "trainer.num_threads": ["1", "2", "1", "2"],
        "trainer.checkpoint_dir": ["a", "b", "a", "b"],
        "tracking.uri": ["sqlite:///a.db", "sqlite:///b.db"] * 2,
        "optimizer.lr": ["0.1", "0.1", "0.01", "0.01"],
    })  # fmt: skip
    assert swept_axes(runs, params) == ["activation", "optimizer.lr"]
