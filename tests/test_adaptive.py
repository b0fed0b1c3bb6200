"""hydra/sweeper=adaptive_seeds: the planning of its rounds on synthetic runs, its settings, and real sweeps."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT, sqlite_uri, tiny_overrides
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict, read_write

from mlpsweep.adaptive import STOP_REASON_TAG, AdaptiveSeeds, plan_round, stop_reason
from mlpsweep.config import CONFIG_DIR, ConfigError
from mlpsweep.sweep import ADAPTIVE_SWEEPER, BASIC_SWEEPER, job_overrides, sweep_key
from mlpsweep.tracking import FAILED_JOB_TAG_PREFIX, ROLE_TAG

FACTORS = ["activation"]
CELLS = [("sigmoid",), ("tanh",), ("relu",)]  # sigmoid is the report's baseline: tanh and relu are compared with it


def runs_of(values: dict[tuple[str, ...], list[float]], factors: list[str] = FACTORS) -> pd.DataFrame:
    """One row per run: seeds 0, 1, ... of each config in turn."""
    rows = [(*cell, seed, acc) for cell, accs in values.items() for seed, acc in enumerate(accs)]
    return pd.DataFrame(rows, columns=[*factors, "seed", "accuracy/test"])


# sigmoid and tanh are tight (their paired differences spread over 0.04 pp), relu is noisy (10 pp)
SYNTHETIC = {("sigmoid",): [0.9000, 0.9003, 0.9001], ("tanh",): [0.9500, 0.9502, 0.9504], ("relu",): [0.80, 0.90]}


def test_a_round_adds_a_seed_to_each_config_of_an_open_comparison() -> None:
    runs = runs_of(SYNTHETIC)
    plan = plan_round(runs, FACTORS, CELLS, precision_pp=0.5, max_seeds=4)
    table = plan.comparisons
    assert list(zip(table.level, table.baseline, table.open)) == [("tanh", "sigmoid", False), ("relu", "sigmoid", True)]
    assert plan.next_seeds == {("sigmoid",): 3, ("relu",): 2} and plan.exhausted == [] and plan.short == []
    # a seed started in this sweep that did not finish (a failed job) is not tried again
    plan = plan_round(runs, FACTORS, CELLS, 0.5, max_seeds=4, started={("relu",): {0, 1, 2}})
    assert plan.next_seeds == {("sigmoid",): 3, ("relu",): 3}
    # max_seeds: sigmoid has run seeds 0, 1 and 2
    plan = plan_round(runs, FACTORS, CELLS, 0.5, max_seeds=3)
    assert plan.next_seeds == {("relu",): 2} and plan.exhausted == [("sigmoid",)]


def test_the_plan_looks_at_widths_not_at_where_the_intervals_lie() -> None:
    shifted = SYNTHETIC | {("relu",): [acc + 0.15 for acc in SYNTHETIC[("relu",)]]}  # from worse to better
    plans = [plan_round(runs_of(values), FACTORS, CELLS, 0.5, 4) for values in (SYNTHETIC, shifted)]
    assert plans[0].comparisons.diff_pp[1] < 0 < plans[1].comparisons.diff_pp[1]
    assert plans[0].next_seeds == plans[1].next_seeds
    assert list(plans[0].comparisons.half_width_pp) == pytest.approx(list(plans[1].comparisons.half_width_pp))


def test_a_config_without_two_finished_runs_gets_a_seed_and_a_precise_grid_stops() -> None:
    plan = plan_round(runs_of(SYNTHETIC | {("relu",): [0.9]}), FACTORS, CELLS, 0.5, 10)  # relu: no interval
    assert plan.short == [("relu",)] and math.isnan(plan.comparisons.ci_width_pp[1]) and plan.comparisons.open[1]
    assert plan.next_seeds == {("sigmoid",): 3, ("relu",): 1}
    tight = SYNTHETIC | {("relu",): [0.9700, 0.9704]}
    plan = plan_round(runs_of(tight), FACTORS, CELLS, 0.5, 10)
    assert plan.next_seeds == {} and not plan.comparisons.open.any()
    assert stop_reason(plan, FACTORS, 0.5, 10) == "all comparisons within ±0.5 pp"
    plan = plan_round(runs_of(SYNTHETIC), FACTORS, CELLS, 0.5, 3, started={("relu",): {2}})
    assert plan.next_seeds == {}
    assert stop_reason(plan, FACTORS, 0.5, 3) == (
        "max_seeds reached for cells activation=sigmoid; activation=relu (3 seeds): "
        "1 comparison(s) still wider than ±0.5 pp"
    )


def test_in_a_factorial_grid_the_interaction_involves_every_config() -> None:
    # seed 0 moves two diagonal configs up 0.05 pp and the other two down (seed 1 the reverse): every
    # simple and main comparison stays within ±2 pp, the interaction (which adds all four) does not
    values = {("sigmoid", "none"): [0.8995, 0.9005], ("sigmoid", "batchnorm"): [0.9505, 0.9495],
              ("relu", "none"): [0.9505, 0.9495], ("relu", "batchnorm"): [0.9695, 0.9705]}  # fmt: skip
    cells = list(values)
    plan = plan_round(runs_of(values, ["activation", "norm"]), ["activation", "norm"], cells, 2.0, 10)
    assert list(plan.comparisons.kind[plan.comparisons.open]) == ["interaction"]
    assert plan.next_seeds == {cell: 2 for cell in cells}


def adaptive_config(*overrides: str, params: dict[str, str] | None = None) -> DictConfig:
    """The composed config, Hydra's node included, of a multirun under hydra/sweeper=adaptive_seeds
    (inside initialize_config_dir: the sweep's checks use Hydra's config loader)."""
    cfg = compose(config_name="train", overrides=["hydra/sweeper=adaptive_seeds", *overrides], return_hydra_config=True)
    if params:  # as a config file sets them (the command line cannot fill the empty dict)
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.sweeper.params = params
    return cfg


def test_the_sweeper_is_registered_and_its_jobs_are_checked_up_to_max_seeds() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        default = compose(config_name="train", return_hydra_config=True).hydra.sweeper
        assert default._target_ == BASIC_SWEEPER
        cfg = adaptive_config("hydra.sweeper.max_seeds=3", "norm=batchnorm", params={"activation": "relu,tanh"})
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_ == ADAPTIVE_SWEEPER
        assert (sweeper.min_seeds, sweeper.precision_pp, sweeper.metric) == (2, 0.5, "accuracy/test")
        assert job_overrides(cfg) == [
            [f"activation={act}", "norm=batchnorm", f"seed={seed}"] for act in ("relu", "tanh") for seed in range(3)
        ]


def test_the_metric_is_an_mlflow_key_or_its_older_name() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for metric in ("accuracy/val", "val_acc"):
            cfg = adaptive_config(f"hydra.sweeper.metric={metric}", params={"activation": "relu,tanh"})
            assert len(job_overrides(cfg)) == 20  # accepted: 2 configs x max_seeds
    assert AdaptiveSeeds(2, 10, 0.5, "val_acc").metric == "accuracy/val"  # what it reads from the store
    # the planning reads either name of the column
    assert plan_round(runs_of(SYNTHETIC).rename(columns={"accuracy/test": "test_acc"}), FACTORS, CELLS, 0.5, 4).next_seeds == {
        ("sigmoid",): 3, ("relu",): 2
    }  # fmt: skip


def test_an_adaptive_sweep_is_not_the_grid_of_the_same_overrides() -> None:
    """resume=true must never reattach a grid's parent to an adaptive sweep of the same overrides."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        grid = compose(config_name="train", overrides=["activation=sigmoid"], return_hydra_config=True)
        again = compose(config_name="train", overrides=["activation=sigmoid"], return_hydra_config=True)
        adaptive = adaptive_config("activation=sigmoid")
    assert sweep_key(grid) == sweep_key(again) != sweep_key(adaptive)


@pytest.mark.parametrize(
    ("overrides", "params", "message"),
    [
        (["seed=4"], None, "seed=4: hydra/sweeper=adaptive_seeds chooses the seeds itself"),
        ([], {"seed": "0,1"}, "seed=0,1: hydra/sweeper=adaptive_seeds chooses the seeds itself"),
        (["hydra.sweeper.min_seeds=1"], None, "hydra.sweeper.min_seeds=1: must be at least 2"),
        (["hydra.sweeper.max_seeds=1"], None, "hydra.sweeper.max_seeds=1: must be at least hydra.sweeper.min_seeds"),
        (["hydra.sweeper.precision_pp=0"], None, "hydra.sweeper.precision_pp=0.0: must be a positive number of pp"),
        (["hydra.sweeper.metric=loss/test"], None, "hydra.sweeper.metric='loss/test': must be one of accuracy/test"),
        (["hydra.sweeper.metric=test_loss"], None, "hydra.sweeper.metric='test_loss': must be one of accuracy/test"),
    ],
)
def test_bad_settings_name_the_key(overrides: list[str], params: dict | None, message: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = adaptive_config(*overrides, params=params)
        with pytest.raises(ConfigError) as err:
            job_overrides(cfg)
    assert message in str(err.value)


# --- real sweeps in subprocesses -----------------------------------------------------------------------

# 1 epoch of a width-8 network at a small learning rate: test accuracies that differ from seed to seed
NOISY = ["depth.widths=[8]", "optimizer.lr=0.01", "trainer.max_epochs=1", "probe.enabled=false"]


def adaptive_sweep(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--multirun", "hydra/sweeper=adaptive_seeds", *args,
               f"hydra.sweep.dir={tmp_path / 'multirun'}"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    print(result.stdout[-5000:], result.stderr[-5000:])
    return result


def parent_and_children(client: MlflowClient) -> tuple:
    runs = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    return parent, children


def seeds_by(children: list, key: str, status: str = "FINISHED") -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for child in children:
        if child.info.status == status:
            found.setdefault(child.data.params[key], []).append(int(child.data.params["seed"]))
    return {value: sorted(seeds) for value, seeds in found.items()}


@pytest.mark.slow
def test_rounds_add_seeds_until_max_seeds_under_one_parent(tiny_mnist_root: Path, tmp_path: Path) -> None:
    # a precision no seed noise meets: round 2 adds seed 2 to both configs, then max_seeds stops it
    args = ["hydra.sweeper.max_seeds=3", "hydra.sweeper.precision_pp=0.01", "activation=relu,tanh", *NOISY]
    result = adaptive_sweep(tiny_overrides(tiny_mnist_root, tmp_path) + args, tmp_path)
    assert result.returncode == 0
    client = MlflowClient(sqlite_uri(tmp_path))
    parent, children = parent_and_children(client)
    assert parent.info.status == "FINISHED"
    assert seeds_by(children, "activation") == {"relu": [0, 1, 2], "tanh": [0, 1, 2]}
    history = {key: [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, key)]
               for key in ("adaptive/round_runs", "adaptive/open_comparisons")}  # fmt: skip
    assert history == {"adaptive/round_runs": [(1, 4), (2, 2)], "adaptive/open_comparisons": [(1, 1), (2, 1)]}
    assert parent.data.tags[STOP_REASON_TAG] == (
        "max_seeds reached for cells activation=relu; activation=tanh (3 seeds): "
        "1 comparison(s) still wider than ±0.01 pp"
    )
    tables = [a.path for a in client.list_artifacts(parent.info.run_id, "adaptive")]
    assert tables == ["adaptive/round_01.csv", "adaptive/round_02.csv"]
    assert sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir()) == [str(n) for n in range(6)]


@pytest.mark.slow
def test_failed_jobs_fail_the_sweep_and_their_configs_get_no_interval(tiny_mnist_root: Path, tmp_path: Path) -> None:
    # lr=1e30 diverges: its config gets seeds up to max_seeds (each failed seed is not tried again),
    # the other one none beyond min_seeds (no comparison has an interval it could narrow)
    args = ["hydra.sweeper.max_seeds=3", "optimizer.lr=0.01,1e30", *NOISY[:1], *NOISY[2:]]
    result = adaptive_sweep(tiny_overrides(tiny_mnist_root, tmp_path) + args, tmp_path)
    assert result.returncode == 1
    parent, children = parent_and_children(MlflowClient(sqlite_uri(tmp_path)))
    assert parent.info.status == "FAILED"
    assert seeds_by(children, "optimizer.lr") == {"0.01": [0, 1]}
    assert seeds_by(children, "optimizer.lr", "FAILED") == {"1e+30": [0, 1, 2]}
    failed = sorted(k for k in parent.data.tags if k.startswith(FAILED_JOB_TAG_PREFIX))
    assert failed == [f"{FAILED_JOB_TAG_PREFIX}{n}" for n in (2, 3, 4)]
    assert parent.data.tags[STOP_REASON_TAG] == (
        "max_seeds reached for cells optimizer.lr=1e+30 (3 seeds): 1 config(s) with fewer than two finished runs"
    )


@pytest.mark.slow
def test_a_swept_seed_stops_the_sweep_before_anything_is_tracked(tiny_mnist_root: Path, tmp_path: Path) -> None:
    result = adaptive_sweep(tiny_overrides(tiny_mnist_root, tmp_path) + ["activation=relu,tanh", "seed=0,1"], tmp_path)
    assert result.returncode == 2
    assert "seed=0,1: hydra/sweeper=adaptive_seeds chooses the seeds itself" in result.stdout + result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_an_interpolation_in_an_override_is_each_jobs_to_resolve() -> None:
    """`trainer.eval_batch_size=${trainer.batch_size}` on the command line of a sweep over the batch
    size: every job's overrides keep the interpolation, so that each job composes its own value
    (read resolved, the sweep's config gave every job the sweep's default batch size instead)."""
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = adaptive_config(
            "trainer.eval_batch_size=${trainer.batch_size}", "+extra=${seed}", params={"trainer.batch_size": "16,64"}
        )
        jobs = job_overrides(cfg)
        loader = GlobalHydra.instance().config_loader()
        for job in jobs:
            composed = loader.load_sweep_config(cfg, job)
            assert composed.trainer.eval_batch_size == composed.trainer.batch_size in (16, 64), job
            assert composed.extra == composed.seed, job
        assert {tuple(job) for job in jobs} == {tuple(job) for job in job_overrides(cfg)}  # the same jobs each time


def test_sweeper_params_are_read_as_the_basic_sweeper_gets_them() -> None:
    """`hydra.sweeper.params` reach Hydra's basic sweeper resolved (Hydra instantiates the sweeper
    with them): the sweep's checks must compose the same jobs as it runs."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.batch_size=16"], return_hydra_config=True)
        with read_write(cfg), open_dict(cfg):
            cfg.hydra.sweeper.params = {"trainer.eval_batch_size": "${trainer.batch_size}", "seed": "0,1"}
        jobs = job_overrides(cfg)
    assert len(jobs) == 2 and all("trainer.eval_batch_size=16" in job for job in jobs), jobs
