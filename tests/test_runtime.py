"""The methodology's runtime configuration, read back from the instantiated Trainer and callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from finsight.cli.lightning_cli import main
from finsight.training.checkpoint import LatestCheckpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build(*overrides: str):
    """Instantiate the methodology config without running it (no weights are loaded)."""
    return main(["--config", str(CONFIGS / "finsight.yaml"), "--trainer.accelerator=cpu",
                 "--trainer.precision=32-true", *overrides], run=False)


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_validation_every_500_optimizer_steps_at_any_accumulation(accumulation):
    cli = build(f"--trainer.accumulate_grad_batches={accumulation}")
    assert cli.trainer.accumulate_grad_batches == accumulation
    assert cli.trainer.val_check_interval == 500 * accumulation  # batches


def test_checkpoint_and_early_stopping_follow_the_methodology():
    cli = build()
    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert checkpoint.monitor == "val/loss" and not checkpoint.save_last and checkpoint.save_top_k == 1
    latest = next(c for c in cli.trainer.callbacks if isinstance(c, LatestCheckpoint))
    assert latest.save_last and latest.save_top_k == 0 and latest.monitor is None
    assert latest._train_time_interval.total_seconds() == 15 * 60 and latest.dirpath == checkpoint.dirpath
    assert checkpoint._save_on_train_epoch_end is False  # saves after each validation: every 500 steps
    stopping = next(c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping))
    assert (stopping.monitor, stopping.patience, stopping.min_delta) == ("val/loss", 3, -0.05)
    assert stopping._check_on_train_epoch_end is False
    assert cli.trainer.gradient_clip_val == 1.0
    assert cli.datamodule.batch_size == 4 and cli.trainer.accumulate_grad_batches == 2
    hp = cli.model.hparams
    assert (hp.learning_rate, hp.weight_decay, hp.warmup_ratio) == (6e-5, 0.0, 0.03)
    assert [s.fraction for s in cli.datamodule.sources] == [0.67, 1.0, 1.0]
    assert cli.model.model is None  # parsing and instantiation never load weights


def test_model_variant_configs_stack_on_the_methodology():
    cli = build("--config", str(CONFIGS / "llama2-7b.yaml"))
    assert cli.model.hparams.model_name == "meta-llama/Llama-2-7b-chat-hf"
    assert cli.datamodule.tokenizer_ref == "meta-llama/Llama-2-7b-chat-hf"
    assert cli.trainer.val_check_interval == 500 * 4


def test_early_stopping_stops_when_val_loss_stops_improving_by_min_delta(tiny_model_dir, tmp_path):
    """Validation every step with lr 0: the loss never improves by 0.05, so 1 + 3 validations then stop."""
    from helpers import tiny_fit_args

    cli = main(tiny_fit_args(
        tiny_model_dir, tmp_path, "--trainer.max_steps=20", "--trainer.val_check_interval=1",
        "--trainer.limit_val_batches=1", "--model.learning_rate=0.0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
        "--trainer.callbacks.monitor=val/loss", "--trainer.callbacks.patience=3",
        "--trainer.callbacks.min_delta=0.05", "--trainer.callbacks.check_on_train_epoch_end=false",
    ))
    stopping = next(c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping))
    assert stopping.wait_count == 3
    assert cli.trainer.global_step == 4  # validated after steps 1..4, stopped after the fourth
