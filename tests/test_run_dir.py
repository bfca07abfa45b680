"""Loggers that keep no folder of their own (MLflow, Weights & Biases): finsight chooses the run folder, every
metric, the data report and the evaluation tables reach the tracker, and ``--ckpt_path last`` resumes the newest
run into the same folder and the same tracked run. Both trackers run for real and are read back."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest
from helpers import free_port, tiny_fit_args, tiny_test_args, wait_until_healthy

from finsight.cli.lightning_cli import main

FIT = ("--trainer.max_steps=2", "--trainer.val_check_interval=2", "--model.quantization=none",
       "--model.gradient_checkpointing=false")


def test_mlflow_with_a_sqlite_store_gets_every_metric_and_file_and_resumes_its_run(tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = ("--trainer.logger=lightning.pytorch.loggers.MLFlowLogger",
              f"--trainer.logger.init_args.tracking_uri={uri}", "--trainer.logger.init_args.experiment_name=fin",
              f"--trainer.default_root_dir={tmp_path}")
    first = main(tiny_fit_args(tiny_model_dir, tmp_path, *FIT, *logger))
    folder = tmp_path / "runs" / "mlflow" / "version_0"
    assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "adapter").is_dir()
    assert (folder / "config.yaml").is_file() and (folder / "data_report.json").is_file()
    run_id = json.loads((folder / "tracked_run.json").read_text())["run_id"]
    assert first.trainer.logger.run_id == run_id

    resumed = main(tiny_fit_args(tiny_model_dir, tmp_path, *FIT, *logger, "--trainer.max_steps=4",
                                 "--ckpt_path=last"))
    assert resumed.trainer.global_step == 4 and resumed.trainer.logger.run_id == run_id
    assert not (tmp_path / "runs" / "mlflow" / "version_1").exists()  # the same folder, continued

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fin")
    assert len(client.search_runs([experiment.experiment_id])) == 1  # one tracked run across the resume
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(losses) == [0, 1, 2, 3]
    assert client.get_metric_history(run_id, "val/loss")
    assert "data_report.json" in {a.path for a in client.list_artifacts(run_id)}

    tested = main(tiny_test_args(tiny_model_dir, tmp_path, *logger, f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"))
    test_run = tested.trainer.logger.run_id
    metrics = client.get_run(test_run).data.metrics
    assert {"test/loss", "test/rouge_l", "test/company_qa/rouge_l"} <= set(metrics)
    assert {"eval_results.json", "eval_results.md"} <= {a.path for a in client.list_artifacts(test_run)}


def test_mlflow_through_a_local_server(tiny_model_dir, tmp_path):
    """The same with ``mlflow server`` on this machine (its SQLite store, artifacts served through it)."""
    import os
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(uri, server, "mlflow server")
        cli = main(tiny_fit_args(tiny_model_dir, tmp_path, *FIT, "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger",
                                 f"--trainer.logger.init_args.tracking_uri={uri}",
                                 f"--trainer.default_root_dir={tmp_path}"))
        run_id = cli.trainer.logger.run_id
        client = MlflowClient(uri)
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [0, 1]
        assert "data_report.json" in {a.path for a in client.list_artifacts(run_id)}
        assert (tmp_path / "runs" / "mlflow" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=30)


def wandb_history(run_file: Path) -> dict[str, list]:
    """The logged values of an offline W&B run, read from its ``.wandb`` file (a log of protobuf records in
    32 KiB blocks, each record cut into chunks with a 7-byte header, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2

    data, records, pending, position = run_file.read_bytes(), [], b"", 7
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            records.append(pending)
            pending = b""
    history: dict[str, list] = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return history


def test_wandb_offline_gets_every_metric_and_the_data_report_and_resumes_its_run(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = ("--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.offline=true",
              f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb_files'}",
              "--trainer.logger.init_args.project=finsight", f"--trainer.default_root_dir={tmp_path}")
    first = main(tiny_fit_args(tiny_model_dir, tmp_path, *FIT, *logger))
    run_id = first.trainer.logger.version
    first.trainer.logger.experiment.finish()
    folder = tmp_path / "runs" / "wandb" / "version_0"
    assert (folder / "checkpoints" / "last.ckpt").is_file() and (folder / "adapter").is_dir()
    assert json.loads((folder / "tracked_run.json").read_text())["run_id"] == run_id
    [run_folder] = glob.glob(str(tmp_path / "wandb_files" / "wandb" / f"offline-run-*-{run_id}"))
    history = wandb_history(next(Path(run_folder).glob("run-*.wandb")))
    assert len(history["train/loss"]) == 2 and history["val/loss"]
    assert "perf/trained_tokens_per_s" in history
    report = json.loads((Path(run_folder) / "files" / "data_report.json").read_text())
    assert report == json.loads((folder / "data_report.json").read_text())

    resumed = main(tiny_fit_args(tiny_model_dir, tmp_path, *FIT, *logger, "--trainer.max_steps=4",
                                 "--ckpt_path=last"))
    assert resumed.trainer.global_step == 4 and resumed.trainer.logger.version == run_id
    resumed.trainer.logger.experiment.finish()
    assert not (tmp_path / "runs" / "wandb" / "version_1").exists()


def test_without_a_logger_last_resumes_from_the_root_folder(tiny_model_dir, tmp_path):
    only_checkpoints = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]
    args = (*FIT, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks={json.dumps(only_checkpoints)}")  # the quickstart's LR monitor needs a logger
    main(tiny_fit_args(tiny_model_dir, tmp_path, *args))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    resumed = main(tiny_fit_args(tiny_model_dir, tmp_path, *args, "--trainer.max_steps=4", "--ckpt_path=last"))
    assert resumed.trainer.global_step == 4
    assert Path(resumed.trainer.ckpt_path) == tmp_path / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("logger", ["lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.CSVLogger"])
def test_loggers_with_a_folder_of_their_own_keep_it(logger):
    from finsight.run_dir import assign_run_folder

    config = {"logger": {"class_path": logger, "init_args": {}},
              "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {}}]}
    assert assign_run_folder(config, resume=False) is None
    assert config["callbacks"][0]["init_args"] == {}
