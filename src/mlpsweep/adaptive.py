"""`hydra/sweeper=adaptive_seeds`: as many seeds per config as the sweep's comparisons need.

Round 1 runs the grid with seeds 0 .. min_seeds - 1. After each round the sweep's finished runs
are read from the store and analysed as the report analyses them (mlpsweep.report.analysis
.comparisons: each level of a swept key against its baseline within each setting of the other
swept keys, averaged over them, and the interactions of each pair of keys), each comparison with
the report's 95% interval (paired by seed where its configs share two seeds or more, else
Welch's). Each config involved in a comparison whose interval is wider than ±precision_pp (its
half-width, in percentage points of the metric), or that has fewer than two finished runs, gets
one more seed: the lowest it has not run. The sweep stops when every interval is within
±precision_pp, or when the configs that still need seeds have run all of 0 .. max_seeds - 1.
In a grid of several keys the interactions, whose intervals are the widest, decide how many.

It stops on precision, not on significance: the rule looks only at each interval's width (the
seed-to-seed spread and n), never at where the interval lies, so looking after every round does
not push the estimates toward or away from zero as stopping at "significant" would. (A round can
still stop when the spread happens to look small, so the coverage may fall a little below 95%.)

All rounds run under the one parent run that mlpsweep.sweep.MlflowSweepCallback opened, with the
configured launcher; the parent records each round (metrics `adaptive/round_runs`,
`adaptive/open_comparisons` and `adaptive/widest_half_width_pp` at step = round, the table
`adaptive/round_NN.csv`) and why the sweep stopped (tag `mlpsweep.adaptive.stop_reason`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict

from mlpsweep import interrupt
from mlpsweep.checkpoint import config_hash
from mlpsweep.engine import metric_key
from mlpsweep.report.analysis import comparisons
from mlpsweep.sweep import SweepSession, adaptive_grid, current_session, no_idle_workers
from mlpsweep.tracking import CONFIG_HASH_TAG, latest_attempts

log = logging.getLogger(__name__)

STOP_REASON_TAG = "mlpsweep.adaptive.stop_reason"
SETTINGS_TAG = "mlpsweep.adaptive.settings"
Cell = tuple[str, ...]  # a config of the grid: the values of the swept keys, in the grid's order


# --- the rounds, pure: DataFrames of finished runs in, plans out -----------------------------------


@dataclass(frozen=True)
class Plan:
    """What one round's results ask for."""

    comparisons: pd.DataFrame  # the report's, with `half_width_pp` and `open` (wider than the target, or no interval)
    short: list[Cell]  # configs with fewer than two finished runs: no interval involving them yet
    next_seeds: dict[Cell, int]  # the configs that get a seed next round, and which seed
    exhausted: list[Cell]  # configs that need a seed but have run all of 0 .. max_seeds - 1


def plan_round(
    runs: pd.DataFrame,
    factors: Sequence[str],
    cells: Sequence[Cell],
    precision_pp: float,
    max_seeds: int,
    metric: str = "accuracy/test",
    started: Mapping[Cell, set[int]] | None = None,
) -> Plan:
    """The next round, from `runs` (one row per finished run: a column per factor, `seed` and
    `metric`): one seed for each config of `cells` involved in an open comparison (95% interval
    wider than ±precision_pp, or none) or with fewer than two finished runs. Its seed is the
    lowest below max_seeds that the config has neither finished nor `started` in this sweep (a
    failed job is not tried again in the same sweep)."""
    table = comparisons(runs, factors, metric, n_resamples=0)
    table["half_width_pp"] = table["ci_width_pp"] / 2
    table["open"] = ~(table["half_width_pp"] <= precision_pp)  # NaN: no interval yet
    finished: dict[Cell, set[int]] = {cell: set() for cell in cells}
    for cell, seed in zip(runs[list(factors)].itertuples(index=False, name=None), runs["seed"]):
        finished.setdefault(cell, set()).add(seed)
    short = [cell for cell in cells if len(finished[cell]) < 2]
    needy = set(short)
    for involved in table["cells"][table["open"]]:  # {factor: level} of each config a comparison involves
        for levels in involved:
            needy |= {cell for cell in cells if all(cell[factors.index(f)] == v for f, v in levels.items())}
    next_seeds, exhausted = {}, []
    for cell in cells:  # the grid's order
        if cell not in needy:
            continue
        tried = finished[cell] | set((started or {}).get(cell, ()))
        seed = next((s for s in range(max_seeds) if s not in tried), None)
        if seed is None:
            exhausted.append(cell)
        else:
            next_seeds[cell] = seed
    return Plan(table, short, next_seeds, exhausted)


def cell_label(cell: Cell, factors: Sequence[str]) -> str:
    return " ".join(f"{factor}={value}" for factor, value in zip(factors, cell)) or "the only config"


def stop_reason(plan: Plan, factors: Sequence[str], precision_pp: float, max_seeds: int) -> str:
    """Why a plan with no next seeds ends the sweep."""
    if not plan.exhausted:
        return f"all comparisons within ±{precision_pp:g} pp"
    cells = "; ".join(cell_label(cell, factors) for cell in plan.exhausted)
    still_open = int(plan.comparisons["open"].sum())
    unresolved = [f"{still_open} comparison(s) still wider than ±{precision_pp:g} pp"] if still_open else []
    unresolved += [f"{len(plan.short)} config(s) with fewer than two finished runs"] if plan.short else []
    return f"max_seeds reached for cells {cells} ({max_seeds} seeds): {', '.join(unresolved)}"


# --- the sweep: rounds of jobs under one parent run ------------------------------------------------


def finished_runs(
    client: MlflowClient, parent_id: str, jobs: Mapping[str, tuple[Cell, int]], factors: Sequence[str], metric: str
) -> pd.DataFrame:
    """One row per finished run of the sweep whose config hash is one of `jobs` (hash -> (config,
    seed)): the factor values, `seed` and `metric`, in the order of `jobs`."""
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50000
    )
    found = {}
    for run in latest_attempts(children):
        job = jobs.get(run.data.tags.get(CONFIG_HASH_TAG, ""))
        if job and run.info.status == "FINISHED" and metric in run.data.metrics:
            found[run.data.tags[CONFIG_HASH_TAG]] = (*job[0], job[1], run.data.metrics[metric])
    rows = [found[h] for h in jobs if h in found]
    return pd.DataFrame(rows, columns=[*factors, "seed", metric])


class AdaptiveSeeds:
    """The sweeper's work (behind hydra_plugins.mlpsweep_adaptive_seeds, the class Hydra knows)."""

    def __init__(self, min_seeds: int, max_seeds: int, precision_pp: float, metric: str) -> None:
        self.min_seeds, self.max_seeds, self.precision_pp = min_seeds, max_seeds, precision_pp
        self.metric = metric_key(metric)  # the MLflow key: accuracy/test also where the config says test_acc

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        grid = adaptive_grid(config)
        keys = [override.split("=", 1)[0] for override in grid[0]]
        values = [[override.split("=", 1)[1] for override in job] for job in grid]
        swept = [i for i, key in enumerate(keys) if len({job[i] for job in values}) > 1]
        self.factors = [keys[i] for i in swept]
        self.cells = {tuple(job[i] for i in swept): overrides for job, overrides in zip(values, grid)}
        no_idle_workers(config, len(self.cells) * self.min_seeds)  # the first round is the largest
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def job(self, cell: Cell, seed: int) -> list[str]:
        return [*self.cells[cell], f"seed={seed}"]

    def job_hash(self, cell: Cell, seed: int) -> str:
        """The config hash the job will run under (its runs carry it as a tag)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, self.job(cell, seed))
        with open_dict(cfg):
            del cfg["hydra"]
        return config_hash(cfg)

    def sweep(self, arguments: list[str]) -> list:
        session = current_session()
        if session is None:
            raise HydraException(
                "hydra/sweeper=adaptive_seeds reads each round's runs from the sweep's parent run: keep "
                "hydra.callbacks.mlflow_sweep (mlpsweep.sweep.MlflowSweepCallback)"
            )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        settings = f"min_seeds={self.min_seeds} max_seeds={self.max_seeds} precision_pp={self.precision_pp:g}"
        session.client.set_tag(session.parent_id, SETTINGS_TAG, f"{settings} metric={self.metric}")
        hashes = {(cell, seed): self.job_hash(cell, seed) for cell in self.cells for seed in range(self.max_seeds)}
        jobs = {h: job for job, h in hashes.items()}
        if session.expected is None:
            session.expected = set()
        started: dict[Cell, set[int]] = {cell: set() for cell in self.cells}
        batch = [(cell, seed) for cell in self.cells for seed in range(self.min_seeds)]
        returns, job_idx, round_num = [], 0, 0
        while batch:
            round_num += 1
            log.info(f"adaptive seeds: round {round_num}, {len(batch)} run(s)")
            session.expected |= {hashes[job] for job in batch}  # before they run: a stop leaves them missing
            results = self.launcher.launch([self.job(*job) for job in batch], initial_job_idx=job_idx)
            for result in results:
                _ = result.return_value  # as the basic sweeper: a job that failed inside Hydra stops the sweep
            returns.append(results)
            job_idx += len(batch)
            for cell, seed in batch:
                started[cell].add(seed)
            interrupt.check()  # a parallel launcher's jobs stopped on a signal: the sweep stops here
            runs = finished_runs(session.client, session.parent_id, jobs, self.factors, self.metric)
            finished = zip(runs[self.factors].itertuples(index=False, name=None), runs["seed"])
            session.expected |= {hashes[(cell, seed)] for cell, seed in finished}  # with resume=true: earlier ones
            plan = plan_round(
                runs, self.factors, list(self.cells), self.precision_pp, self.max_seeds, self.metric, started
            )
            self.record(session, round_num, len(batch), plan)
            batch = list(plan.next_seeds.items())
        reason = stop_reason(plan, self.factors, self.precision_pp, self.max_seeds)
        session.client.set_tag(session.parent_id, STOP_REASON_TAG, reason)
        log.info(f"adaptive seeds: stopped after {round_num} round(s), {job_idx} run(s): {reason}")
        return returns

    def record(self, session: SweepSession, round_num: int, runs: int, plan: Plan) -> None:
        """The round on the parent run: its runs, its open comparisons, the widest interval, its table."""
        table = plan.comparisons
        widest, still_open = table["half_width_pp"].max() if len(table) else 0.0, int(table["open"].sum())
        client, parent_id = session.client, session.parent_id
        client.log_metric(parent_id, "adaptive/round_runs", runs, step=round_num)
        client.log_metric(parent_id, "adaptive/open_comparisons", still_open, step=round_num)
        if not math.isnan(widest):
            client.log_metric(parent_id, "adaptive/widest_half_width_pp", float(widest), step=round_num)
        client.log_text(parent_id, table.to_csv(index=False), f"adaptive/round_{round_num:02d}.csv")
        log.info(
            f"adaptive seeds: after round {round_num}, {still_open} of {len(table)} comparison(s) wider "
            f"than ±{self.precision_pp:g} pp; next: {len(plan.next_seeds)} run(s)"
        )

