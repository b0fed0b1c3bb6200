"""What users wait for: whole sweeps, end to end, under each launcher, in one invocation.

Each sweep runs as `python train.py -m ...` in a fresh folder with its own SQLite store; the wall
clock runs from the command's start to its exit (the last run is in the store by then). Printed per
sweep and launcher: wall seconds, finished runs, training samples per second (runs x epochs x
training images / wall), the seconds spent training (each run's epochs; a pack's epochs once), and
two per-job fixed costs:

- per job, all included: (wall - training - start-up) / jobs, start-up being one `python train.py
  --help`: the sweep's one-time costs (a new store, torch's and MLflow's first calls, the figure
  workers' start) are shared by its jobs;
- per added job (`--added`): what one more job costs, from the same sweep with fewer seeds run just
  after it: ((wall - training) - (wall_fewer - training_fewer)) / (jobs - jobs_fewer).

    MNIST_ROOT=../shared/data python benchmarks/bench_sweep.py                      # (a), all launchers
    MNIST_ROOT=../shared/data python benchmarks/bench_sweep.py --sweeps a,b,c,lecture --launchers basic,packed
    MNIST_ROOT=../shared/data python benchmarks/bench_sweep.py --sweeps a --set data.limit_train=3200   # quick
    MNIST_ROOT=../shared/data python benchmarks/bench_sweep.py --sweeps a --launchers packed --added      # per added job
    python benchmarks/bench_sweep.py --sweeps a,c --launchers basic,packed --logs bench-logs   # keep the output

Sweeps: (a) activation x norm x 3 seeds of the lecture's 165-165 MLP for 3 epochs (18 runs); (b) the
same for the 1024-300 MLP; (c) 8 seeds x 4 learning rates of the 165-165 MLP for 3 epochs (32 runs);
(lecture) (b) at 10 epochs, the lecture's activation x norm ablation.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
ABLATION = ["activation=sigmoid,tanh,relu", "norm=none,batchnorm", "seed=0,1,2"]
SWEEPS = {
    "a": [*ABLATION, "depth.widths=[165,165]", "trainer.max_epochs=3"],
    "b": [*ABLATION, "depth.widths=[1024,300]", "trainer.max_epochs=3"],
    "c": ["seed=0,1,2,3,4,5,6,7", "optimizer.lr=0.01,0.03,0.1,0.3", "depth.widths=[165,165]", "trainer.max_epochs=3"],
    "lecture": [*ABLATION, "depth.widths=[1024,300]", "trainer.max_epochs=10"],
}
# the seeds of each sweep's smaller variant (--added): the same configs, fewer jobs
FEWER_SEEDS = {"a": "seed=0", "b": "seed=0", "c": "seed=0,1", "lecture": "seed=0"}
PARALLEL = {"joblib"}  # jobs overlap: no per-job fixed cost to derive from the wall clock
LAUNCHERS = {
    "basic": ["hydra/launcher=basic"],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    "packed": ["hydra/launcher=packed"],
}


def run_sweep(
    sweep: list[str], launcher: str, extra: list[str], folder: Path, log: Path, repo: Path
) -> dict[str, float]:
    """Run one sweep of `repo`'s train.py under one launcher in `folder` (its output into `log` as it
    runs); its timings and counts from the store."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    command = [sys.executable, str(repo / "train.py"), "-m", *LAUNCHERS[launcher], *sweep, *extra,
               f"tracking.uri={uri}", f"hydra.sweep.dir={folder / 'multirun'}", "trainer.progress_bar=false"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "src"), env.get("PYTHONPATH", "")])  # that checkout's mlpsweep
    if "MNIST_ROOT" in env:  # the sweep runs in `folder`: a relative root would point elsewhere
        env["MNIST_ROOT"] = str(Path(env["MNIST_ROOT"]).resolve())
    start = time.perf_counter()
    with log.open("w") as output:
        done = subprocess.run(command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mlpsweep")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    finished = [r for r in children if r.info.status == "FINISHED"]
    epochs: set[tuple[str, int, float]] = set()  # a pack's members share their epochs' times: count them once
    for run in finished:
        history = client.get_metric_history(run.info.run_id, "epoch_time_s")
        owner = "pack" if run.data.params.get("train_step", "").startswith("packed") else run.info.run_id
        epochs |= {(owner, m.step, m.value) for m in history}
    train_images = (
        int(finished[0].data.params["data.limit_train"])
        if finished and finished[0].data.params.get("data.limit_train", "None") != "None"
        else 54000
    )
    max_epochs = int(finished[0].data.params["trainer.max_epochs"]) if finished else 0
    return {
        "rc": done.returncode,
        "wall": wall,
        "jobs": len(children),
        "finished": len(finished),
        "train": sum(seconds for _, _, seconds in epochs),
        "samples_per_s": len(finished) * max_epochs * train_images / wall,
    }


def timed_sweep(sweep: list[str], launcher: str, extra: list[str], log: Path, repo: Path) -> dict[str, float]:
    """run_sweep in a fresh folder, removed after."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-{launcher}-"))
    try:
        return run_sweep(sweep, launcher, extra, root, log, repo)
    finally:
        shutil.rmtree(root)


def startup_seconds(repo: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(repo / "train.py"), "--help"], capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweeps", default="a", help=f"comma-separated, of {', '.join(SWEEPS)}")
    parser.add_argument(
        "--launchers", default="basic,joblib,packed", help=f"comma-separated, of {', '.join(LAUNCHERS)}"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], help="extra overrides for every sweep, e.g. trainer.device=cuda"
    )
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="the checkout whose train.py runs (e.g. a worktree of an earlier commit)"
    )
    parser.add_argument(
        "--added",
        action="store_true",
        help="also run each sweep with fewer seeds (after it), for the fixed cost per added job",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        help="write each sweep's output to LOGS/<sweep>-<launcher>.log (default: a temporary folder)",
    )
    args = parser.parse_args()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"machine: {platform.node()}, {device}, torch {torch.__version__}, python {platform.python_version()}")
    startup = startup_seconds(args.repo)
    print(
        f"{args.repo}: start-up (python train.py --help) {startup:.1f}s; extra overrides: {' '.join(args.set) or 'none'}"
    )
    print("| sweep | launcher | runs finished | wall s | training s | samples/s | fixed cost per job s | per added job s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    for sweep in args.sweeps.split(","):
        walls = {}
        for launcher in args.launchers.split(","):
            added = None
            result = timed_sweep(SWEEPS[sweep], launcher, args.set, logs / f"{sweep}-{launcher}.log", args.repo)
            sequential = result["finished"] and launcher not in PARALLEL
            fixed = (result["wall"] - result["train"] - startup) / result["jobs"] if sequential else None
            if args.added and sequential and result["finished"] == result["jobs"]:
                # after the whole sweep, not before: what the first sweep pays for cold caches is not
                # taken off the added jobs' cost
                fewer = [o for o in SWEEPS[sweep] if not o.startswith("seed=")] + [FEWER_SEEDS[sweep]]
                small = timed_sweep(fewer, launcher, args.set, logs / f"{sweep}-{launcher}-fewer.log", args.repo)
                if small["finished"] == small["jobs"] > 0:
                    rest, small_rest = result["wall"] - result["train"], small["wall"] - small["train"]
                    added = (rest - small_rest) / (result["jobs"] - small["jobs"])
            walls[launcher] = result["wall"]
            print(f"| {sweep} | {launcher} | {result['finished']}/{result['jobs']} (rc {result['rc']}) | {result['wall']:.1f} | "
                  f"{result['train']:.1f} | {result['samples_per_s']:,.0f} | {'-' if fixed is None else f'{fixed:.2f}'} | "
                  f"{'-' if added is None else f'{added:.2f}'} |", flush=True)  # fmt: skip
        if "basic" in walls and len(walls) > 1:
            ratios = ", ".join(
                f"{name} {walls['basic'] / wall:.2f}x" for name, wall in walls.items() if name != "basic"
            )
            print(f"sweep {sweep}, end to end vs the basic launcher: {ratios}", flush=True)


if __name__ == "__main__":
    main()
