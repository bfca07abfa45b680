"""``LatestCheckpoint``: ``last.ckpt`` is the newest state whether or not validation improved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_fit_args, tiny_test_args

from finsight.cli.lightning_cli import main
from finsight.training.checkpoint import CheckpointSettingsError, LatestCheckpoint

# Validation at steps 2, 4 and 6 of a 7-step run; ``mode: max`` on a falling val/loss makes only the first
# validation the best, so every later one "does not improve".
STEPS, VALIDATE_EVERY = 7, 2


def _callbacks(latest: bool) -> list[dict]:
    best = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/loss", "mode": "max", "save_top_k": 1, "save_last": not latest,
                          "filename": "step{step}", "auto_insert_metric_name": False}}
    return [best, *([{"class_path": "finsight.callbacks.LatestCheckpoint"}] if latest else [])]


def _fit(tiny_model_dir: Path, root: Path, latest: bool):
    config = root / "callbacks.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": _callbacks(latest)}}))
    args = tiny_fit_args(tiny_model_dir, root, "--config", str(config), f"--trainer.max_steps={STEPS}",
                         f"--trainer.val_check_interval={VALIDATE_EVERY}")
    torch.set_num_threads(1)
    return main(args)


def _step(path: str | Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_lightnings_own_last_checkpoint_stays_at_the_last_improvement(tiny_model_dir, tmp_path):
    """The failure LatestCheckpoint exists for: ModelCheckpoint(save_last=True) alone ends at step 2."""
    cli = _fit(tiny_model_dir, tmp_path, latest=False)
    last = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    assert cli.trainer.global_step == STEPS
    assert _step(last) == VALIDATE_EVERY


def test_last_checkpoint_is_the_final_step_after_non_improving_validations(tiny_model_dir, tmp_path):
    cli = _fit(tiny_model_dir, tmp_path, latest=True)
    best, latest = cli.trainer.checkpoint_callbacks
    assert isinstance(latest, LatestCheckpoint) and best.dirpath == latest.dirpath
    folder = Path(latest.dirpath)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", f"step{VALIDATE_EVERY}.ckpt"]
    assert Path(best.best_model_path).name == f"step{VALIDATE_EVERY}.ckpt"
    assert _step(folder / "last.ckpt") == STEPS
    # The last checkpoint holds the best checkpoint's record, so a resume keeps tracking the best.
    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    best_state = next(v for k, v in state.items() if k.startswith("ModelCheckpoint"))
    assert Path(best_state["best_model_path"]).name == f"step{VALIDATE_EVERY}.ckpt"


def test_contradicting_cadences_are_refused_by_name():
    with pytest.raises(CheckpointSettingsError, match="every_n_minutes=5 and every_n_train_steps=100 both set"):
        LatestCheckpoint(every_n_minutes=5, every_n_train_steps=100)
    with pytest.raises(CheckpointSettingsError, match="every_n_minutes must be > 0, got 0"):
        LatestCheckpoint(every_n_minutes=0)


def test_a_full_disk_during_a_save_stops_the_run_with_one_error_line_and_keeps_the_last_checkpoint(
        tiny_model_dir, tmp_path, monkeypatch):
    """The step-4 last.ckpt runs out of space half-way: one ``error:`` line naming the folder and the space
    needed, exit status 1, and last.ckpt still the complete checkpoint of step 2."""
    from fit_worker import FULL_DISK_ENV
    from helpers import run_finsight

    monkeypatch.setenv(FULL_DISK_ENV, "last.ckpt@4")
    args = tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=6", "--trainer.val_check_interval=2",
                         "--trainer.plugins=fit_worker.FullDiskCheckpointIO")
    output = run_finsight(args, tmp_path / "cache", expect_failure=True)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    folder = tmp_path / "lightning_logs" / "quickstart" / "version_0" / "checkpoints"
    assert errors == [line for line in output.splitlines() if "error:" in line]  # one line, no traceback
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left in {folder} to write checkpoint "
                                                     "last.ckpt: it needs about "), output[-3000:]
    assert "Traceback" not in output
    assert _step(folder / "last.ckpt") == 2
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_a_resume_with_changed_settings_is_refused_naming_each_change(tiny_model_dir, tmp_path):
    from finsight.training.reliability import ResumeChangedError

    torch.set_num_threads(1)
    main(tiny_fit_args(tiny_model_dir, tmp_path))
    with pytest.raises(ResumeChangedError) as caught:
        main(tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=3", "--ckpt_path=last",
                           "--data.batch_size=1", "--trainer.accumulate_grad_batches=2", "--data.max_length=256"))
    message = str(caught.value)
    assert message.startswith("--ckpt_path: this run changes what the checkpoint's steps were trained with: ")
    assert "trainer.accumulate_grad_batches was 1, now 2" in message
    assert "data.batch_size was 2, now 1" in message and "data.max_length was 512, now 256" in message
    assert "data.seed" not in message and "data.sources" not in message and "\n" not in message
    with pytest.raises(ResumeChangedError, match=r"data.sources was \[.*\], now \[\{'name': 'intro'"):
        main(tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=3", "--ckpt_path=last",
                           '--data.sources=[{"name": "intro", "format": "intro", "rows": 14}]'))
    with pytest.raises(ResumeChangedError, match=r"data.seed was 42, now 7(;|\.)"):
        main(tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=3", "--ckpt_path=last", "--data.seed=7"))
    # Unchanged settings resume.
    resumed = main(tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=3", "--ckpt_path=last"))
    assert resumed.trainer.global_step == 3


def test_resume_last_finds_the_newest_training_run_past_test_runs_without_checkpoints(tiny_model_dir, tmp_path):
    """`finsight test` (and validate, predict) log into version folders of their own, with no checkpoints:
    `--ckpt_path last` resumes the newest run that has a last.ckpt instead of starting from scratch there."""
    torch.set_num_threads(1)
    runs = tmp_path / "lightning_logs" / "quickstart"
    first = main(tiny_fit_args(tiny_model_dir, tmp_path, "--ckpt_path=last"))  # nothing to resume: a fresh run
    assert first.trainer.global_step == 2 and Path(first.trainer.log_dir) == runs / "version_0"
    main(tiny_test_args(tiny_model_dir, tmp_path, "--ckpt_path", str(runs / "version_0/checkpoints/last.ckpt")))
    assert (runs / "version_1").is_dir() and not (runs / "version_1/checkpoints").exists()
    resumed = main(tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=3", "--ckpt_path=last"))
    assert Path(resumed.trainer.log_dir) == runs / "version_0"
    assert resumed.trainer.global_step == 3
    assert torch.load(runs / "version_0/checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]


def test_a_resume_on_more_processes_is_refused_naming_the_world_size(tiny_model_dir, tmp_path):
    """A checkpoint of a one-process run resumed with DDP on 2 processes: each optimizer step would see twice the
    samples, so the steps left are not the ones the run planned. One error line, before any step is trained."""
    from helpers import run_finsight

    torch.set_num_threads(1)
    main(tiny_fit_args(tiny_model_dir, tmp_path))
    output = run_finsight(tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=3", "--ckpt_path=last",
                                        "--trainer.devices=2", "--trainer.strategy=ddp"),
                          tmp_path / "cache", expect_failure=True)
    errors = {line for line in output.splitlines() if "error:" in line}
    assert len(errors) == 1, output[-3000:]
    (error,) = errors
    assert error.startswith("error: --ckpt_path: this run changes what the checkpoint's steps were trained with: ")
    assert "trainer.devices (world size) was 1, now 2" in error and "Traceback" not in output
