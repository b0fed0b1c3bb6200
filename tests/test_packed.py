"""Packed training (mlpsweep.packed, hydra/launcher=packed): each member of a pack trains as its
solo run would.

Tolerance: without dropout a member's per-epoch losses and accuracies match its solo run's to
1e-5 (absolute) and its weights and batch-norm statistics to 1e-5 relative + 1e-6 absolute after
50 steps: the stacked network computes the same arithmetic in another order (batched matrix
products, its own batch-norm and loss reductions), so float32 rounding differs in the last bits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import REPO_ROOT, sqlite_uri, tiny_overrides
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mlpsweep.checkpoint import CheckpointError, config_hash
from mlpsweep.cli import ask_figures_ahead, fresh_state, new_probe
from mlpsweep.data import load_splits
from mlpsweep.engine import DivergenceError, EpochMetrics, fit
from mlpsweep.pack_checkpoint import (
    PackIdentity,
    load_pack_checkpoint,
    other_cuts,
    pack_checkpoint_path,
    save_pack_checkpoint,
)
from mlpsweep.packed import Member, MemberResult, PackedTrainer
from mlpsweep.packing import plan_packs, resume_pack, train_pack
from mlpsweep.rendering import Figures
from mlpsweep.stats import welch_difference
from mlpsweep.tracking import CONFIG_HASH_TAG, ROLE_TAG, prepare_store, run_name

STEPS = ["data.limit_train=64", "trainer.max_epochs=25", "depth.widths=[48,24]"]  # 2 steps an epoch: 50 steps
CPU = torch.device("cpu")


def solo(cfg: DictConfig, device: torch.device = CPU) -> tuple[list[EpochMetrics], torch.nn.Sequential]:
    """The config trained alone, by the engine's own loop (its fastest step)."""
    data = load_splits(cfg.data, device)
    model, optimizer, schedule, generator = fresh_state(cfg, data, device)
    return fit(model, optimizer, data, cfg.trainer, generator, schedule=schedule), model


def pack_trainer(cfgs: list[DictConfig], device: torch.device = CPU) -> PackedTrainer:
    """The configs built as one pack, in the given order, as its jobs build them."""
    data = load_splits(cfgs[0].data, device)
    members = []
    for cfg in cfgs:
        model, optimizer, schedule, generator = fresh_state(cfg, data, device)
        probe = new_probe(cfg, model, data) if cfg.probe.enabled else None
        members.append(
            Member(run_name(cfg), cfg, model, optimizer, schedule, generator, probe, {0, cfg.trainer.max_epochs})
        )
    return PackedTrainer(members, data, device)


def pack(cfgs: list[DictConfig], device: torch.device = CPU) -> list[MemberResult]:
    """The configs trained as one pack, in the given order."""
    trainer = pack_trainer(cfgs, device)
    trainer.fit()
    return trainer.results(train_seconds=1.0)


def train_py(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in `cwd`, its store named by the args (not by $MLFLOW_TRACKING_URI)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, str(REPO_ROOT / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def artifact_files(client: MlflowClient, run_id: str, folder: str | None = None) -> dict[str, int]:
    """Every artifact file of a run: its path and size."""
    files = {}
    for item in client.list_artifacts(run_id, folder):
        files |= artifact_files(client, run_id, item.path) if item.is_dir else {item.path: item.file_size}
    return files


def assert_same_run(
    result: MemberResult, history: list[EpochMetrics], model: torch.nn.Sequential, tolerance: float = 1e-5
) -> None:
    assert result.error is None
    assert [m.epoch for m in result.history] == [m.epoch for m in history]
    for packed, alone in zip(result.history, history, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert getattr(packed, key) == pytest.approx(getattr(alone, key), abs=tolerance), (packed.epoch, key)
    packed_state, solo_state = result.model.state_dict(), model.state_dict()
    assert packed_state.keys() == solo_state.keys()
    for key, value in solo_state.items():
        torch.testing.assert_close(packed_state[key], value, rtol=tolerance, atol=tolerance / 10, msg=key)


MIXED = [  # activations, norms, learning rates, momentum, weight decay, init and schedules in one pack
    ["activation=relu", "norm=none", "seed=0"],
    ["activation=tanh", "norm=batchnorm", "seed=1", "optimizer.lr=0.05"],
    ["activation=sigmoid", "norm=batchnorm", "seed=2", "optimizer=sgd_momentum", "optimizer.nesterov=true"],
    ["activation=relu", "norm=layernorm", "seed=3", "optimizer.weight_decay=1e-3", "init=kaiming_normal"],
    ["activation=leaky_relu", "norm=none", "seed=4", "scheduler=onecycle"],
    ["activation=gelu", "norm=batchnorm", "seed=5", "scheduler=step", "scheduler.step_size=5"],
    ["activation=tanh", "norm=none", "seed=6", "scheduler=plateau", "scheduler.patience=0", "optimizer.lr=0.5"],
]


def test_a_mixed_pack_trains_each_member_as_its_solo_run(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfgs = [tiny_cfg(*STEPS, "probe.enabled=false", *overrides) for overrides in MIXED]
    for cfg, result in zip(cfgs, pack(cfgs), strict=True):
        assert_same_run(result, *solo(cfg))


BACKPROP_PACKS = {  # packs the CPU's hand-derived packed step trains (ReLU-likes, sigmoid, tanh; batch norm)
    "plain SGD, updates fused": [  # batch norms: the first two normalised as one run, the third alone
        ["activation=relu", "norm=none", "seed=0"],
        ["activation=tanh", "norm=batchnorm", "seed=1", "optimizer.lr=0.05"],
        ["activation=sigmoid", "norm=batchnorm", "seed=2", "optimizer.lr=0.3", "scheduler=onecycle"],
        ["activation=relu", "norm=batchnorm", "seed=4", "norm.momentum=0.3"],
        ["activation=leaky_relu", "norm=none", "seed=3"],
    ],
    "momentum and weight decay, no biases": [
        ["activation=relu", "norm=batchnorm", "seed=0", "optimizer=sgd_momentum"],
        ["activation=tanh", "norm=none", "seed=1", "optimizer.weight_decay=1e-3"],
        ["activation=sigmoid", "norm=batchnorm", "seed=2", "optimizer=sgd_momentum", "optimizer.nesterov=true"],
        ["activation=relu", "norm=none", "seed=3", "scheduler=step", "scheduler.step_size=5"],
    ],
}


@pytest.mark.parametrize("name", list(BACKPROP_PACKS))
def test_the_cpus_packed_backprop_step_trains_each_member_as_its_solo_run(
    tiny_cfg: Callable[..., DictConfig], name: str
) -> None:
    biases = ["model.bias=false"] if "no biases" in name else []
    cfgs = [tiny_cfg(*STEPS, "probe.enabled=false", *biases, *overrides) for overrides in BACKPROP_PACKS[name]]
    results = pack(cfgs)
    assert {result.train_step for result in results} == {"packed_backprop"}
    for cfg, result in zip(cfgs, results, strict=True):
        assert_same_run(result, *solo(cfg))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_pack_is_one_graph_and_matches_solo_cuda_runs(tiny_cfg: Callable[..., DictConfig]) -> None:
    """On a GPU the pack's step is one CUDA graph and each solo run's too; cuBLAS's batched and
    single products round differently, hence 1e-4."""
    cuda = torch.device("cuda")
    cfgs = [tiny_cfg(*STEPS, "probe.enabled=false", "trainer.device=cuda", *overrides) for overrides in MIXED]
    results = pack(cfgs, cuda)
    assert {result.train_step for result in results} == {"packed_cuda_graph"}
    for cfg, result in zip(cfgs, results, strict=True):
        assert_same_run(result, *solo(cfg, cuda), tolerance=1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_and_adamw_members_match_their_solo_runs(tiny_cfg: Callable[..., DictConfig], optimizer: str) -> None:
    """Each member its own weight decay, in the gradient (L2) or decoupled (AdamW's, and Adam's with
    decoupled_weight_decay=true). Without batch norm: the bias of a Linear before a batch norm has
    a gradient of zero up to rounding, which Adam scales up to steps of the learning rate, so such
    biases (and the running means that follow them) take another random walk in any other
    summation order (README: Packed sweeps)."""
    cfgs = [
        tiny_cfg(*STEPS, "probe.enabled=false", f"optimizer={optimizer}", f"seed={seed}", f"optimizer.lr={lr}", *more)
        for seed, lr, *more in [
            (0, 1e-3, "norm=none"),
            (1, 3e-3, "norm=layernorm", "optimizer.weight_decay=0.05"),
            (2, 3e-3, "norm=none", "optimizer.weight_decay=0.05", *(["+optimizer.decoupled_weight_decay=true"] if optimizer == "adam" else [])),
        ]
    ]  # fmt: skip
    for cfg, result in zip(cfgs, pack(cfgs), strict=True):
        assert_same_run(result, *solo(cfg))


def test_a_diverging_member_fails_alone_and_early_stopping_stops_one(tiny_cfg: Callable[..., DictConfig]) -> None:
    common = (*STEPS, "probe.enabled=false")
    steady = tiny_cfg(*common, "seed=0")
    diverging = tiny_cfg(*common, "seed=1", "optimizer.lr=1e30")
    stopping = tiny_cfg(
        *common,
        "seed=2",
        "trainer.early_stopping.patience=1",
        "trainer.early_stopping.min_delta=1",
        "trainer.early_stopping.restore_best=false",
    )
    results = pack([steady, diverging, stopping])
    assert_same_run(results[0], *solo(steady))
    assert isinstance(results[1].error, DivergenceError)
    with pytest.raises(DivergenceError) as solo_error:
        solo(diverging)
    assert str(results[1].error) == str(solo_error.value)
    history, model = solo(stopping)
    assert len(history) == 2  # stopped after patience 1: no epoch improves by 1
    assert_same_run(results[2], history, model)


def test_a_pack_whose_members_all_diverge_fails_each_alone(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfgs = [tiny_cfg(*STEPS, "probe.enabled=false", f"seed={seed}", "optimizer.lr=1e30") for seed in (0, 1)]
    assert all(isinstance(result.error, DivergenceError) for result in pack(cfgs))


def test_a_member_whose_validation_loss_is_nan_fails_alone_as_its_solo_run(tiny_cfg: Callable[..., DictConfig]) -> None:
    """Every training step's loss finite, the validation loss NaN (outputs that overflow in eval
    mode only; here a negative running variance that momentum 0 never updates): the run fails at
    that epoch, solo and packed alike, and no epoch with a NaN reaches the history (or the store)."""
    cfgs = [tiny_cfg(*STEPS, "trainer.max_epochs=3", "probe.enabled=false", "norm=batchnorm", "norm.momentum=0",
                     f"seed={seed}") for seed in (0, 1)]  # fmt: skip
    corrupt = lambda model: [m.running_var.fill_(-1.0) for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]  # noqa: E731
    data = load_splits(cfgs[0].data, CPU)
    model, optimizer, schedule, generator = fresh_state(cfgs[0], data, CPU)
    corrupt(model)
    with pytest.raises(DivergenceError, match="^val loss diverged to nan at epoch 1$"):
        fit(model, optimizer, data, cfgs[0].trainer, generator, schedule=schedule)
    trainer = pack_trainer(cfgs)
    corrupt(trainer.members[0].model)
    trainer = PackedTrainer(trainer.members, trainer.data, CPU)  # stacked from the corrupted member
    trainer.fit()
    diverged, trained = trainer.results(train_seconds=1.0)
    assert str(diverged.error) == "val loss diverged to nan at epoch 1" and diverged.history == []
    history, _ = solo(cfgs[1])
    assert trained.error is None and len(trained.history) == 3
    assert [m.val_loss for m in trained.history] == pytest.approx([m.val_loss for m in history], rel=1e-5)
    n = len(data.val)  # accuracies as the solo run divides them, in double precision (not 0.8299999833106995)
    assert all(m.val_acc == round(m.val_acc * n) / n for m in trained.history)


def test_a_failed_member_asks_for_the_figures_a_failed_solo_run_logs(tiny_cfg: Callable[..., DictConfig]) -> None:
    """A failed run has the probe's grids of the epochs it reached, not the figures drawn at a
    run's end (learning curves, confusion matrix, gradient norms over the epochs)."""
    cfgs = [tiny_cfg(*STEPS, "trainer.max_epochs=2", f"optimizer.lr={lr}") for lr in (1e30, 0.1)]
    asked = {}
    for cfg, result in zip(cfgs, pack(cfgs), strict=True):
        drawn = Figures.ahead()
        ask_figures_ahead(cfg, result, drawn)
        asked[result.error is None] = sorted(request.artifact_path for _, request in drawn.pending)
        drawn.close()
    assert asked[False] == ["probe/epoch_000.png"]
    assert asked[True] == ["confusion_matrix.png", "learning_curves.png", "probe/epoch_000.png", "probe/epoch_002.png",
                           "probe/gradient_norms.png"]  # fmt: skip


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]
)  # fmt: skip
def test_a_members_probe_grids_are_asked_for_as_its_pack_trains_on_a_gpu(
    device: str, tiny_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU a member's probe grid goes to the figure workers as its snapshot is taken (they
    draw while the pack trains); on a CPU, whose cores the training takes, as the pack has finished,
    with the figures of the run's end."""
    events: list[str] = []
    add, results = Figures.add, PackedTrainer.results
    monkeypatch.setattr(Figures, "add", lambda self, *request: events.append(request[2]) or add(self, *request))
    monkeypatch.setattr(PackedTrainer, "results", lambda self, **kw: events.append("trained") or results(self, **kw))
    cfgs = [tiny_cfg(*STEPS, "trainer.max_epochs=2", f"trainer.device={device}", f"seed={seed}") for seed in (0, 1)]
    trained = train_pack(cfgs, [True, True])
    try:
        grids = ["probe/epoch_000.png", "probe/epoch_002.png"] * 2 if device == "cuda" else []
        assert sorted(events[: events.index("trained")]) == sorted(grids)
        for result in trained:
            assert sorted(request.artifact_path for _, request in result.figures.pending) == [
                "confusion_matrix.png", "learning_curves.png", "probe/epoch_000.png", "probe/epoch_002.png",
                "probe/gradient_norms.png",
            ]  # fmt: skip
    finally:
        for result in trained:
            result.figures.close()


def test_the_probe_sees_a_member_as_it_sees_its_solo_run(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfgs = [tiny_cfg(*STEPS, "trainer.max_epochs=3", f"seed={seed}", "norm=batchnorm") for seed in (0, 1)]
    result = pack(cfgs)[1]
    _, model = solo(cfgs[1])
    data = load_splits(cfgs[1].data, CPU)
    expected = new_probe(cfgs[1], model, data).snapshot(3, with_histograms=True)
    last = result.snapshots[-1]
    assert [s.epoch for s in result.snapshots] == [0, 1, 2, 3]
    assert last.layers.keys() == expected.layers.keys()
    for name, layer in expected.layers.items():
        for key, value in layer.stats.items():
            assert last.layers[name].stats[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (name, key)
        assert last.layers[name].histograms.keys() == layer.histograms.keys()


class Stop(Exception):
    """Stands for an interrupt after an epoch's checkpoint."""


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]
)  # fmt: skip
def test_an_interrupted_pack_continues_from_its_checkpoint_as_if_never_stopped(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, device: str
) -> None:
    """Dropout's masks, a per-step schedule, batch norm, a member that diverged before the
    interrupt and one early stopping stops after it: all bit for bit (on a GPU too: the restored
    tensors are the ones its CUDA graph was captured on)."""
    common = (*STEPS, "trainer.max_epochs=6", f"trainer.device={device}")
    cfgs = [
        tiny_cfg(*common, "seed=0", "dropout.p=0.3", "scheduler=onecycle"),
        tiny_cfg(*common, "seed=1", "optimizer.lr=1e30"),
        tiny_cfg(*common, "seed=2", "norm=batchnorm", "optimizer=sgd_momentum", "trainer.early_stopping.patience=3",
                 "trainer.early_stopping.min_delta=1"),  # fmt: skip
    ]
    identity = PackIdentity("sqlite:///store.db", "mlpsweep", "digest", "sweep", ("a", "b", "c"))
    checkpoint = tmp_path / "pack.pt"
    whole = pack(cfgs, torch.device(device))

    interrupted = pack_trainer(cfgs, torch.device(device))

    def save_then_stop(epoch: int) -> None:
        save_pack_checkpoint(checkpoint, identity, interrupted, epoch)
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        interrupted.fit(after_epoch=save_then_stop)
    resumed = pack_trainer(cfgs, torch.device(device))
    assert load_pack_checkpoint(checkpoint, identity, resumed) == 2
    resumed.fit()
    for before, after in zip(whole, resumed.results(train_seconds=1.0), strict=True):
        untimed = [[replace(m, epoch_time_s=0) for m in result.history] for result in (before, after)]
        assert untimed[1] == untimed[0]
        assert after.snapshots == before.snapshots
        assert str(after.error) == str(before.error)
        weights = [result.model.state_dict().values() for result in (before, after)]
        assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
    assert isinstance(whole[1].error, DivergenceError) and 2 < len(whole[2].history) < 6  # diverged, then stopped


def test_a_pack_checkpoint_of_another_pack_is_refused_and_changes_nothing(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfgs = [tiny_cfg(*STEPS, "trainer.max_epochs=2", f"seed={seed}") for seed in (0, 1, 2)]
    identity = PackIdentity("sqlite:///store.db", "mlpsweep", "digest", "sweep", ("a", "b"))
    checkpoint = tmp_path / "pack.pt"
    two = pack_trainer(cfgs[:2])
    two.fit(after_epoch=lambda epoch: save_pack_checkpoint(checkpoint, identity, two, epoch))
    three = pack_trainer(cfgs)
    before = [t.clone() for t in three.net.params]
    with pytest.raises(CheckpointError, match="not a checkpoint of this pack/store/data \\(config_hashes differs\\)"):
        load_pack_checkpoint(checkpoint, replace(identity, config_hashes=("a", "b", "c")), three)
    with pytest.raises(CheckpointError, match="malformed, or not for this pack .*2 members, the pack has 3"):
        load_pack_checkpoint(checkpoint, identity, three)
    assert all(torch.equal(a, b) for a, b in zip(three.net.params, before, strict=True))
    assert three.epochs_done == 0 and not any(m.history for m in three.members)

    tampered = {"members.1.probe_seconds": "abc", "rng.torch_cuda": 5, "members.0.history.0.val_acc": "0.9"}
    for where, value in tampered.items():
        state = torch.load(checkpoint, weights_only=True)
        *path, last = [int(key) if key.isdigit() else key for key in where.split(".")]
        node = state
        for key in path:
            node = node[key]
        node[last] = value
        torch.save(state, tmp_path / "tampered.pt")
        fresh = pack_trainer(cfgs[:2])
        before = [t.clone() for t in fresh.net.params]
        with pytest.raises(CheckpointError, match="malformed, or not for this pack"):
            load_pack_checkpoint(tmp_path / "tampered.pt", identity, fresh)
        assert all(torch.equal(a, b) for a, b in zip(fresh.net.params, before, strict=True)), where
        assert fresh.epochs_done == 0 and not any(m.history for m in fresh.members), where


def test_a_pack_cut_otherwise_on_resume_names_the_checkpoint_of_the_old_cut(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sweep resumed with another pack size cuts other packs: their files cannot continue them.
    The log names the file that holds the pack's members and how to continue it; files of other
    sweeps, or without the pack's members, are not named (forget_pack removes the named ones)."""
    cfgs = [tiny_cfg(*STEPS, "trainer.max_epochs=1", "probe.enabled=false", f"seed={seed}") for seed in (0, 1, 2)]
    old_cut = PackIdentity("sqlite:///store.db", "mlpsweep", "digest", "sweep", ("a", "b"))
    identities = {
        "old cut": old_cut,
        "other sweep": replace(old_cut, sweep="another sweep"),
        "other members": replace(old_cut, config_hashes=("c", "d")),
    }
    files = {name: pack_checkpoint_path(tmp_path, identity) for name, identity in identities.items()}
    two = pack_trainer(cfgs[:2])
    for name, identity in identities.items():
        save_pack_checkpoint(files[name], identity, two, epoch=1)
    new_cut = replace(old_cut, config_hashes=("a", "b", "e"))
    assert other_cuts(tmp_path, new_cut) == {files["old cut"]: old_cut}
    three = pack_trainer(cfgs)
    with caplog.at_level("WARNING", logger="mlpsweep.packing"):
        resume_pack(pack_checkpoint_path(tmp_path, new_cut), new_cut, three)
    assert f"resume: {files['old cut']} holds 2 of this pack's 3 jobs in a pack of 2" in caplog.text
    assert "another sweep" not in caplog.text and three.epochs_done == 0


def test_with_dropout_members_reach_the_accuracy_of_solo_runs(tiny_cfg: Callable[..., DictConfig]) -> None:
    """Dropout masks come from another random stream in a pack, so compare distributions over seeds:
    the 95% interval on the difference of mean final validation accuracy includes zero."""
    seeds = range(8)
    cfgs = [
        tiny_cfg("trainer.max_epochs=3", "depth.widths=[48,24]", "probe.enabled=false", "dropout=lecture", f"seed={s}")
        for s in seeds
    ]
    packed = [result.history[-1].val_acc for result in pack(cfgs)]
    alone = [solo(cfg)[0][-1].val_acc for cfg in cfgs]
    difference = welch_difference(packed, alone)
    assert difference.low <= 0 <= difference.high, (packed, alone)


def test_plan_packs_groups_by_shape_and_says_why_a_job_runs_alone(tiny_cfg: Callable[..., DictConfig]) -> None:
    sweep = [tiny_cfg(f"seed={s}") for s in range(5)] + [
        tiny_cfg("trainer.fast_step=false"),
        tiny_cfg("depth.widths=[32]"),
        tiny_cfg("optimizer=adam"),
        tiny_cfg("norm=batchnorm", "+norm.track_running_stats=false"),
        tiny_cfg("optimizer=adam", "+optimizer.amsgrad=true", "seed=1"),
        tiny_cfg("seed=5", "trainer.device=auto"),  # the CPU here, or a GPU
    ]
    hydra_node = {"hydra": {}}
    configs = [DictConfig({**cfg, **hydra_node}) for cfg in sweep]
    plan = plan_packs(configs, pack_size=3)
    packs = [unit.jobs for unit in plan.units if unit.packed]
    assert packs == ([[0, 1, 2], [3, 4]] if torch.cuda.is_available() else [[0, 1, 2], [3, 4, 10]])
    remote = [unit.jobs for unit in plan_packs(configs, pack_size=3, remote=True).units if unit.packed]
    assert remote == [[0, 1, 2], [3, 4]]  # a submitit task's machine resolves `auto` itself
    reasons = {unit.jobs[0]: unit.reason for unit in plan.units if not unit.packed}
    assert "fast_step=false" in reasons[5]
    assert "no other job" in reasons[6] and "no other job" in reasons[7]
    assert "running statistics" in reasons[8]
    assert reasons[9] == "optimizer.amsgrad=True has no packed update"  # another adam: the amsgrad one alone
    on_cpu = "11 jobs: 6 in 2 packs (3, 3), 5 alone"
    assert ("11 jobs: 5 in 2 packs (3, 2), 6 alone" if torch.cuda.is_available() else on_cpu) in plan.summary()
    even = [unit.jobs for unit in plan_packs(configs[:5], pack_size=4).units]
    assert even == [[0, 1, 2], [3, 4]]  # packs as even as can be: no job left over to train alone (4, 1)
    assert "\tjob #15 runs alone: trainer.fast_step=false" in plan.summary(first_job=10)  # a later batch's numbers


def test_a_resumed_sweep_cuts_the_packs_it_cut_before(tiny_cfg: Callable[..., DictConfig]) -> None:
    """Jobs that finished (or failed, and run again) leave their packs without shifting the others:
    the interrupted pack [2, 3] is cut again, and finds its checkpoint."""
    sweep = [tiny_cfg(f"seed={s}", "resume=true") for s in range(6)]
    client, experiment = prepare_store(sweep[0].tracking.uri, sweep[0].tracking.experiment)
    for cfg, status in ((sweep[0], "FINISHED"), (sweep[1], "FAILED")):
        run = client.create_run(experiment, tags={CONFIG_HASH_TAG: config_hash(cfg)})
        client.set_terminated(run.info.run_id, status)
    plan = plan_packs([DictConfig({**cfg, "hydra": {}}) for cfg in sweep], pack_size=2)
    assert [unit.jobs for unit in plan.units if unit.packed] == [[2, 3], [4, 5]]
    reasons = {unit.jobs[0]: unit.reason for unit in plan.units if not unit.packed}
    assert reasons == {0: "it already finished (resume=true skips it)",
                       1: "the other jobs of its pack finished or continue their own runs (resume=true)"}  # fmt: skip


def test_packed_launcher_gives_the_store_a_basic_sweep_gives(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """The same sweep under hydra/launcher=packed and the basic launcher: one parent, a FINISHED child
    per config with the same params and metric keys, the same test accuracy, a model that loads
    and predicts like the basic sweep's."""
    sweep = ["activation=relu,tanh", "norm=batchnorm", "seed=0", "depth.widths=[32,16]", "tracking.log_model=true"]
    stores = {}
    for launcher in ("basic", "packed"):
        folder = tmp_path / launcher
        folder.mkdir()
        args = ["-m", f"hydra/launcher={launcher}", *tiny_overrides(tiny_mnist_root, folder), *sweep,
                f"hydra.sweep.dir={folder / 'multirun'}"]  # fmt: skip
        done = train_py(args, folder)
        assert done.returncode == 0, done.stderr[-3000:]
        stores[launcher] = MlflowClient(sqlite_uri(folder))
        if launcher == "packed":
            assert "2 jobs: 2 in 1 pack (2), 0 alone" in done.stderr + done.stdout
    children = {}
    for launcher, client in stores.items():
        runs = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        children[launcher] = {r.info.run_name: r for r in runs if r not in parents}
        assert len(children[launcher]) == 2
        assert all(r.info.status == "FINISHED" for r in children[launcher].values())
        # the first metric a run logs is what MLflow's compare view plots by default
        assert {next(iter(r.data.metrics)) for r in children[launcher].values()} == {"accuracy/val"}
    assert children["basic"].keys() == children["packed"].keys()
    for name, basic in children["basic"].items():
        packed = children["packed"][name]
        assert set(basic.data.metrics) == set(packed.data.metrics)
        assert set(basic.data.params) == set(packed.data.params)
        assert (
            packed.data.params["train_step"] == "packed_backprop"
        )  # relu and tanh, batch norm: the hand-derived packed step
        for key in ("accuracy/test", "loss/test"):
            assert packed.data.metrics[key] == pytest.approx(basic.data.metrics[key], abs=1e-4), (name, key)
        # the same artifacts: the figures a packed member's pack asked for ahead, none twice, none left out
        packed_files = artifact_files(stores["packed"], packed.info.run_id)
        assert packed_files.keys() == artifact_files(stores["basic"], basic.info.run_id).keys()
        assert all(size > 0 for size in packed_files.values())
    name = next(iter(children["packed"]))
    x = torch.randn(5, 784)
    models = {}
    for launcher, client in stores.items():
        mlflow.set_tracking_uri(client.tracking_uri)
        models[launcher] = mlflow.pytorch.load_model(f"runs:/{children[launcher][name].info.run_id}/model")
    assert repr(models["packed"]) == repr(models["basic"])  # the same module (MLflow may load an exported graph)
    torch.testing.assert_close(models["packed"](x), models["basic"](x), rtol=1e-4, atol=1e-4)


def test_packs_run_as_submitit_tasks(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """backend=submitit with submitit's local executor: each pack is one task (a process of its
    own), and the sweep's store is what the local backend gives."""
    args = [
        "-m", "hydra/launcher=packed", "hydra.launcher.backend=submitit",
        "hydra.launcher.submitit.cluster=local", "hydra.launcher.submitit.gpus_per_node=0", "hydra.launcher.pack_size=4",
        "activation=sigmoid,relu", "depth.widths=[32],[16,8]", "trainer.max_epochs=1", "probe.enabled=false",
        *tiny_overrides(tiny_mnist_root, tmp_path), f"hydra.sweep.dir={tmp_path / 'm'}",
    ]  # fmt: skip
    done = train_py(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 jobs: 4 in 2 packs (2, 2), 0 alone" in done.stderr + done.stdout
    client = MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 5 and len(children) == 4
    assert all(
        r.info.status == "FINISHED" and r.data.params["train_step"].startswith("packed") for r in runs if r in children
    )
    assert len(list((tmp_path / "m" / ".submitit").rglob("*_log.out"))) == 2  # one task per pack


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("hydra.launcher.backend=ray", "hydra.launcher.backend"),
        ("hydra.launcher.backend=submitit", "hydra.launcher.pack_size"),  # its default would be the launcher's
        ("hydra.launcher.pack_size=0", "hydra.launcher.pack_size"),
    ],
)
def test_a_bad_launcher_setting_stops_the_sweep_before_it_starts(
    tiny_mnist_root: Path, tmp_path: Path, setting: str, named: str
) -> None:
    args = ["-m", "hydra/launcher=packed", setting, "seed=0,1", *tiny_overrides(tiny_mnist_root, tmp_path),
            f"hydra.sweep.dir={tmp_path / 'm'}"]  # fmt: skip
    done = train_py(args, tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert named in done.stdout + done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "m").exists()


def test_a_packed_sweep_fails_resumes_and_feeds_optuna_like_a_basic_one(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """Failure handling and resume: a diverging member fails alone (exit 1), a resumed sweep skips
    the finished config and trains only the other; and Optuna's trials, launched in batches, get
    their objective from packed jobs."""
    small = ["depth.widths=[16]", "trainer.max_epochs=1", "probe.enabled=false"]
    sweep = ["-m", "hydra/launcher=packed", "seed=0", "optimizer.lr=0.1,1e30", *small,
             *tiny_overrides(tiny_mnist_root, tmp_path), "tracking.sweep_name=packed-resume"]  # fmt: skip
    first = train_py([*sweep, f"hydra.sweep.dir={tmp_path / 'm1'}"], tmp_path, timeout=300)
    assert first.returncode == 1, first.stderr[-3000:]
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment = client.get_experiment_by_name("mlpsweep").experiment_id
    children = client.search_runs([experiment], "tags.mlflow.parentRunId != ''")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    resumed = train_py([*sweep, "resume=true", f"hydra.sweep.dir={tmp_path / 'm2'}"], tmp_path, timeout=300)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert (resumed.stdout + resumed.stderr).count("it already finished (resume=true skips it)") == 1
    children = client.search_runs([experiment], "tags.mlflow.parentRunId != ''")
    assert sorted(r.info.status for r in children) == ["FAILED", "FAILED", "FINISHED"]  # only the diverging one again

    optuna = ["hparams_search=optuna", "hydra/launcher=packed",
              "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "~hydra.sweeper.params.depth", *small,
              *tiny_overrides(tiny_mnist_root, tmp_path / "optuna"), f"hydra.sweep.dir={tmp_path / 'o'}"]  # fmt: skip
    (tmp_path / "optuna").mkdir()
    done = train_py(optuna, tmp_path / "optuna", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("in 1 pack (2)") == 1  # a batch of two trials
    import yaml

    results = yaml.safe_load((tmp_path / "o" / "optimization_results.yaml").read_text())
    assert 0 < results["best_value"] <= 1


@pytest.mark.slow
def test_ctrl_c_during_a_packs_training_and_resume_continues_the_pack(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """SIGINT once the pack has checkpointed an epoch: exit 130, no run half-logged; `resume=true`
    continues the pack from that epoch (not from its first), every member then logged whole."""
    epochs = 300  # a few milliseconds each: the pack is still training when the signal lands
    sweep = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "hydra/launcher=packed", "seed=0,1",
             *tiny_overrides(tiny_mnist_root, tmp_path), f"trainer.max_epochs={epochs}", "depth.widths=[16]",
             "probe.enabled=false", "tracking.log_model=false"]  # fmt: skip
    process = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not any((tmp_path / "checkpoints").glob("pack-*.pt")):
        assert process.poll() is None and time.monotonic() < deadline, "the pack wrote no checkpoint"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment = client.get_experiment_by_name("mlpsweep").experiment_id
    assert client.search_runs([experiment], "tags.mlflow.parentRunId != ''") == []  # members log once trained

    resumed = train_py([*sweep[2:], "resume=true"], tmp_path)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    continued = re.search(r"resume: the pack continues after epoch (\d+)", log)
    assert continued and 0 < int(continued.group(1)) < epochs, log[-3000:]
    assert f"pack epoch {int(continued.group(1)) + 1}/{epochs}:" in log and "pack epoch 1/" not in log
    children = client.search_runs([experiment], "tags.mlflow.parentRunId != ''")
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss/train")]
        assert steps == list(range(1, epochs + 1))
    assert not any((tmp_path / "checkpoints").glob("pack-*"))  # trained: the pack's checkpoint is gone


@pytest.mark.slow
def test_a_job_resumed_alone_names_the_checkpoint_of_its_old_pack_and_removes_it(
    tiny_mnist_root: Path, tmp_path: Path
) -> None:
    """A pack interrupted while it trains, resumed with pack_size=1: each job trains alone from
    epoch 0, the log names the pack's checkpoint (resume with the old pack_size continues it), and
    the file goes once the jobs have run."""
    sweep = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "hydra/launcher=packed", "seed=0,1",
             *tiny_overrides(tiny_mnist_root, tmp_path), "trainer.max_epochs=300", "depth.widths=[16]",
             "probe.enabled=false"]  # fmt: skip
    process = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (checkpoints := list((tmp_path / "checkpoints").glob("pack-*.pt"))):
        assert process.poll() is None and time.monotonic() < deadline, "the pack wrote no checkpoint"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]

    resumed = train_py([*sweep[2:], "resume=true", "hydra.launcher.pack_size=1"], tmp_path)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    for job in (0, 1):
        assert (
            f"resume: {checkpoints[0]} holds job #{job} in a pack of 2; the job now runs alone "
            "(hydra.launcher.pack_size=1) from epoch 0" in log
        ), log[-3000:]
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment = client.get_experiment_by_name("mlpsweep").experiment_id
    children = client.search_runs([experiment], "tags.mlflow.parentRunId != ''")
    assert sorted((r.info.status, r.data.params["train_step"]) for r in children) == [("FINISHED", "backprop")] * 2
    assert not any((tmp_path / "checkpoints").glob("pack-*"))


@pytest.mark.slow
def test_ctrl_c_while_a_pack_is_logged_and_resume_logs_the_rest_from_its_checkpoint(
    tiny_mnist_root: Path, tmp_path: Path
) -> None:
    """SIGINT once the pack has trained and its jobs log their runs: the pack's checkpoint stays,
    and `resume=true` logs the jobs left from it, without training again."""
    sweep = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "hydra/launcher=packed", "seed=0,1,2,3",
             *tiny_overrides(tiny_mnist_root, tmp_path), "depth.widths=[16]"]  # fmt: skip
    process = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:  # until the second job starts to log its run
        if "\t#1 : " in line:
            os.kill(process.pid, signal.SIGINT)
            break
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    assert len(list((tmp_path / "checkpoints").glob("pack-*.pt"))) == 1

    resumed = train_py([*sweep[2:], "resume=true"], tmp_path)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "from the checkpoint of their pack of 4" in log and "resume: the pack continues after epoch 2" in log
    assert "pack epoch" not in log  # nothing trained again
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment = client.get_experiment_by_name("mlpsweep").experiment_id
    finished = client.search_runs([experiment], "tags.mlflow.parentRunId != '' and attributes.status = 'FINISHED'")
    assert sorted(r.data.params["seed"] for r in finished) == ["0", "1", "2", "3"]
    assert {r.info.status for r in client.search_runs([experiment])} <= {"FINISHED", "FAILED"}  # none left RUNNING
    assert not any((tmp_path / "checkpoints").glob("pack-*"))


@pytest.mark.slow
def test_ctrl_c_in_a_later_round_of_an_adaptive_sweep_leaves_it_killed_and_resumable(
    tiny_mnist_root: Path, tmp_path: Path
) -> None:
    """A sweeper that decides its jobs as it goes, stopped while a later round's pack trains: every
    run in the store is FINISHED (the pack logs none yet), yet the sweep is not; its parent ends
    KILLED with the line that continues it, and `resume=true` finishes it."""
    sweep = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "hydra/sweeper=adaptive_seeds", "hydra/launcher=packed",
             "hydra.sweeper.max_seeds=3", "hydra.sweeper.precision_pp=0.01", "activation=relu,tanh",
             *tiny_overrides(tiny_mnist_root, tmp_path), "trainer.max_epochs=300", "depth.widths=[8]",
             "optimizer.lr=1e-5", "probe.enabled=false", "tracking.log_model=false"]  # fmt: skip (seeds far apart)
    process = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    packs = 0
    for line in process.stdout:  # until round 2's pack starts to train
        packs += "pack of " in line and " runs on cpu" in line
        if packs == 2:
            os.kill(process.pid, signal.SIGINT)
            break
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-3000:]
    assert "interrupted with 4 configs finished; continue it with:" in output, output[-3000:]
    client = MlflowClient(sqlite_uri(tmp_path))
    experiment = client.get_experiment_by_name("mlpsweep").experiment_id
    (parent,) = [r for r in client.search_runs([experiment]) if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert parent.info.status == "KILLED"

    resumed = train_py([*sweep[2:], "resume=true"], tmp_path)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    finished = client.search_runs([experiment], "tags.mlflow.parentRunId != '' and attributes.status = 'FINISHED'")
    assert sorted((r.data.params["activation"], r.data.params["seed"]) for r in finished) == [
        ("relu", "0"), ("relu", "1"), ("relu", "2"), ("tanh", "0"), ("tanh", "1"), ("tanh", "2")
    ]  # fmt: skip
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
