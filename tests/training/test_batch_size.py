"""Automatic batch size scaling: Lightning's batch size finder drives ``FinSightDataModule.batch_size``.

On a CPU nothing runs out of memory, so the power search simply doubles for ``max_trials`` trials; what
matters is that the size it ends on is the one the rest of the run trains with (loader, length-grouped
order, step count) and that the learning-rate schedule is sized for it.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import tiny_fit_args

from finsight.cli.lightning_cli import main
from finsight.data.batching import EpochLengthGroupedSampler, TokenBudgetBatchSampler
from finsight.training.batch_size import BatchSizeFinderSettingsError

SOURCES = '[{"name": "intro", "format": "intro", "rows": 14}]'  # 13 train / 1 validation sample


def finder_arg(**init_args: int | str) -> str:
    spec = {"class_path": "finsight.callbacks.FinSightBatchSizeFinder",
            "init_args": {"mode": "power", "steps_per_trial": 1, **init_args}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


@pytest.mark.parametrize("init_val, max_trials", [(2, 2)])
def test_batch_size_finder_sets_the_batch_size_the_run_trains_with(tiny_model_dir, tmp_path, init_val,
                                                                  max_trials):
    recorder = {"class_path": "fit_worker.SampleRecorder", "init_args": {"out_dir": str(tmp_path)}}
    cli = main(tiny_fit_args(
        tiny_model_dir, tmp_path,
        "--trainer.max_steps=-1", "--trainer.max_epochs=1", "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=1",
        "--model.quantization=none", "--model.gradient_checkpointing=false",  # speed only: not what is tested
        f"--trainer.default_root_dir={tmp_path}",  # the finder's temporary checkpoint goes there
        "--data.batch_size=2", "--data.val_fraction=0.1", f"--data.sources={SOURCES}",
        finder_arg(init_val=init_val, max_trials=max_trials), f"--trainer.callbacks+={json.dumps(recorder)}",
    ))
    # Lightning 2.6 counts trials: init, then doubled after every successful trial but the last.
    found = init_val * 2 ** (max_trials - 1)
    assert found == 4
    dm, trainer = cli.datamodule, cli.trainer
    assert dm.batch_size == found
    assert trainer.train_dataloader.batch_size == found
    record = json.loads((tmp_path / "run-rank0.json").read_text())
    n_train = len(record["lengths"])
    assert n_train == 13
    # The whole epoch after the search, once, in the length-grouped order for the new batch size.
    consumed = [i for batch in record["batches"] for i in batch]
    assert consumed == list(EpochLengthGroupedSampler(record["lengths"], found, dm.seed))
    assert [len(b) for b in record["batches"]] == [found] * (n_train // found) + [n_train % found]
    assert trainer.global_step == math.ceil(n_train / found)
    # The schedule was rebuilt for the batch size found: the linear decay ends exactly at the last step.
    # (Sized for the configured batch size 2 it would expect 7 steps and stop about halfway down.)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == trainer.global_step
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0
    assert not list(tmp_path.glob(".scale_batch_size_*.ckpt"))  # the finder cleans up after itself


def test_with_a_token_budget_the_finder_searches_the_budget(tiny_model_dir, tmp_path):
    """data.batch_tokens set: the finder searches the budget in rows of max_length tokens, 2 × 512 then
    4 × 512 tokens, and the run trains with the budget found, its schedule sized for it."""
    recorder = {"class_path": "fit_worker.SampleRecorder", "init_args": {"out_dir": str(tmp_path)}}
    cli = main(tiny_fit_args(
        tiny_model_dir, tmp_path,
        "--trainer.max_steps=-1", "--trainer.max_epochs=1", "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=1", "--model.quantization=none", "--model.gradient_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}", "--data.batch_tokens=512", "--data.val_fraction=0.1",
        f"--data.sources={SOURCES}", finder_arg(max_trials=2), f"--trainer.callbacks+={json.dumps(recorder)}",
    ))
    dm, trainer = cli.datamodule, cli.trainer
    assert dm.batch_tokens == 2048 and dm.batch_size == 2  # the budget moved; the batch size did not
    record = json.loads((tmp_path / "run-rank0.json").read_text())
    lengths = record["lengths"]
    expected = [list(batch) for batch in TokenBudgetBatchSampler(lengths, 2048, dm.seed)]
    assert record["batches"] == expected  # the epoch after the search, cut to the budget found
    assert all(len(batch) * -(-max(lengths[i] for i in batch) // 8) * 8 <= 2048 for batch in record["batches"])
    assert trainer.global_step == len(expected)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # the schedule ends exactly at the last step


def test_a_search_of_batch_tokens_in_tokens_is_one_clear_error(tiny_model_dir, tmp_path):
    args = tiny_fit_args(tiny_model_dir, tmp_path, f"--trainer.default_root_dir={tmp_path}",
                         "--data.batch_tokens=512", f"--data.sources={SOURCES}", "--data.val_fraction=0.1",
                         finder_arg(max_trials=1, batch_arg_name="batch_tokens"))
    with pytest.raises(BatchSizeFinderSettingsError, match=r"cannot search batch_tokens directly .* searches "
                                                           r"batch_token_rows"):
        main(args)
