"""train(cfg) against a real SQLite MLflow store: a complete run, a failed run, no run for bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_TEST, TINY_TRAIN, TINY_VAL, compose_config, sqlite_uri, tiny_overrides, write_tiny_mnist
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mlpsweep.cli import train
from mlpsweep.data import dataset_digest, load_splits
from mlpsweep.engine import DivergenceError
from mlpsweep.tracking import (
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    artifact_location,
    flatten,
    get_or_create_experiment,
    redacted,
    resolve_tracking_uri,
    split_datasets,
    unanswered,
)


def only_run(store_dir: Path):
    client = MlflowClient(sqlite_uri(store_dir))
    experiment = client.get_experiment_by_name("mlpsweep")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_a_run_logs_params_metrics_config_and_model(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    best_val_acc = train(tiny_cfg("norm=batchnorm", "dropout=lecture", "depth.widths=[64,32]", "tracking.log_model=true"))

    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "relu-batchnorm-p0.2-64x32-s0"
    params = run.data.params
    assert {k: params[k] for k in ("activation", "norm", "dropout", "depth")} == {
        "activation": "relu",
        "norm": "batchnorm",
        "dropout": "0.2",
        "depth": "64x32",
    }
    assert params["trainer.batch_size"] == "32" and params["optimizer.lr"] == "0.1"
    assert params["depth.widths"] == "[64, 32]" and params["data.val_size"] == str(TINY_VAL)
    assert params["num_params"] == str((784 * 64 + 64) + 2 * 64 + (64 * 32 + 32) + 2 * 32 + (32 * 10 + 10))
    assert params["train_step"] == "backprop"  # plain SGD on the CPU

    for key in ("loss/train", "accuracy/train", "loss/val", "accuracy/val", "epoch_time_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    assert best_val_acc == max(m.value for m in client.get_metric_history(run.info.run_id, "accuracy/val"))
    assert 0.5 < run.data.metrics["accuracy/test"] <= 1 and run.data.metrics["loss/test"] > 0
    # the run page groups charts by the part of a key before its last "/", sorted by name: accuracy, loss, then the probe
    groups = sorted({key.rpartition("/")[0] for key in run.data.metrics if "/" in key})
    assert groups[:2] == ["accuracy", "loss"] and any(group.startswith("probe/") for group in groups[2:])

    # the MLflow UI opens the experiment as model training; the run names the data it used
    assert client.get_experiment(run.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert {context: dataset.name for context, dataset in inputs.items()} == {
        "training": "mnist-train", "validation": "mnist-val", "testing": "mnist-test"
    }  # fmt: skip
    assert [json.loads(inputs[c].profile)["num_rows"] for c in ("training", "validation", "testing")] == [
        TINY_TRAIN - TINY_VAL, TINY_VAL, TINY_TEST
    ]  # fmt: skip
    assert len({d.digest for d in inputs.values()}) == 3
    assert all(json.loads(d.source)["uri"].endswith("MNIST/raw") for d in inputs.values())

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml"} <= artifacts
    assert "val_size: 100" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()

    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [run.info.run_id]
    loaded = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    assert loaded(torch.zeros(3, 784)).shape == (3, 10)


def test_a_failing_run_ends_failed_with_the_error(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    with pytest.raises(DivergenceError):
        train(tiny_cfg("optimizer.lr=1e30"))
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "DivergenceError: loss diverged" in run.data.tags[ERROR_TAG]
    assert "traceback.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert client.get_metric_history(run.info.run_id, "loss/train") == []  # no NaN was logged


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///other.db") == "sqlite:///other.db"


def test_artifacts_of_a_sqlite_store_sit_beside_it(tmp_path: Path) -> None:
    assert artifact_location(sqlite_uri(tmp_path)) == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None


def test_flatten_gives_dotted_keys() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def test_real_mnist_smoke_run(real_mnist_root: Path, tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    train(tiny_cfg(f"data.root={real_mnist_root}", "data.val_size=6000", "data.limit_train=10000", "trainer.max_epochs=1"))
    _, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["accuracy/test"] > 0.9


def test_a_changed_data_file_is_a_new_digest(tiny_mnist_root: Path, tmp_path: Path) -> None:
    def digests(root: Path) -> dict[str, str]:
        cfg = compose_config(tiny_overrides(root))
        data = load_splits(cfg.data, torch.device("cpu"))
        return {c: d.digest for c, d in split_datasets(cfg.data, data, dataset_digest("mnist", root)).items()}

    changed = write_tiny_mnist(tmp_path)
    images = changed / "MNIST" / "raw" / "train-images-idx3-ubyte"
    with images.open("r+b") as file:  # one pixel of one image
        file.seek(16 + 28 * 28 * 7 + 100)
        pixel = file.read(1)[0]
        file.seek(-1, 1)
        file.write(bytes([255 - pixel]))
    before, after = digests(tiny_mnist_root), digests(changed)
    assert before == digests(write_tiny_mnist(tmp_path / "same"))  # same files, same digests
    assert all(before[c] != after[c] for c in before)


def test_an_existing_experiment_is_marked_as_model_training_once(tmp_path: Path) -> None:
    client = MlflowClient(sqlite_uri(tmp_path))
    plain = client.create_experiment("plain")
    assert get_or_create_experiment(client, "plain") == plain
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    client.set_experiment_tag(plain, EXPERIMENT_KIND_TAG, "genai_development")  # a user's own choice stays
    get_or_create_experiment(client, "plain")
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_system_metrics_when_asked(tiny_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    train(tiny_cfg("tracking.system_metrics=true", "probe.enabled=false"))
    _, run = only_run(tmp_path)
    assert "system/cpu_utilization_percentage" in run.data.metrics


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://mlflow:secret@127.0.0.1:5432/mlflow", "postgresql://mlflow:***@127.0.0.1:5432/mlflow"),
        ("tracking.uri=postgresql\\://u\\:pw@host\\:1/db seed=0", "tracking.uri=postgresql\\://u\\:***@host\\:1/db seed=0"),
        ("https://user:p%40ss@example.com/mlflow and mysql://a:b@c/d", "https://user:***@example.com/mlflow and mysql://a:***@c/d"),
        ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),  # a port is no password
        ("mysql+pymysql://u@host/db sqlite:////data/a@b.db", "mysql+pymysql://u@host/db sqlite:////data/a@b.db"),
        ("postgresql://u:p/x@host/db", "postgresql://u:***@host/db"),  # a password with a slash
        ("postgresql://h/db?user=u&password=secret&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
    ],
)
def test_a_uri_password_is_never_shown(text: str, shown: str) -> None:
    assert redacted(text) == shown


@pytest.mark.parametrize(
    "uri",
    ["postgresql://u@localhost/db?host=/var/run/postgresql", "mysql+pymysql://u:p@localhost/db?unix_socket=/run/x.sock",
     "mssql+pyodbc://u:p@MyDataSource", "sqlite:///mlflow.db"],
)  # fmt: skip
def test_a_store_on_a_local_socket_or_a_data_source_is_not_probed(uri: str) -> None:
    """No TCP port to knock on: the store is left to MLflow (a probe would refuse a working one)."""
    assert unanswered(uri) is None
