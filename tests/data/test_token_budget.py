"""``data.batch_tokens``: micro-batches filled to a token budget instead of a count of conversations.

Every epoch trains every sample once in micro-batches within the budget; the number of micro-batches is the
same every epoch (Lightning reads it once); ranks get as many micro-batches each, of the same budget; the
step totals make the optimizer step's gradient that of one big batch of the same conversations.
"""

from __future__ import annotations

import io
import json
import math
from functools import partial

import pytest
import torch
from helpers import qlora_module_for_gradients, sample_sources, tensorboard_scalars, tiny_fit_args
from rich.console import Console

from finsight import FinSightDataModule
from finsight.cli.lightning_cli import main
from finsight.compat.lightning import distributed_sampler
from finsight.data.batching import (
    CONVERSATION_LENGTHS,
    STEP_TOKENS,
    FinSightCollator,
    PackingCollator,
    StepTokens,
    TokenBudgetBatchSampler,
    WithStepTokens,
    cut_to_budget,
    packed_tokens,
    padded_tokens,
)
from finsight.data.sources import DataSourceError

MAX_LENGTH = 256
BUDGET = 1024


def test_cut_to_budget_counts_the_tensor_the_collator_builds():
    lengths = [8, 8, 16, 16, 16, 64, 300]
    padded = partial(padded_tokens, pad_to_multiple_of=8)
    # Unpacked: 3 × 16 = 48 fits, a fourth 16 would make 64; 16 and 16; 64 alone; 300 is over the budget, alone.
    assert cut_to_budget(lengths, 48, padded) == [3, 2, 1, 1]
    assert cut_to_budget(lengths, 64, padded) == [4, 1, 1, 1]
    # Packed into rows of 32: [16, 16] and [16, 8, 8] make 2 rows × 32; 64 and 300 are longer than a row.
    packed = partial(packed_tokens, row_length=32, pad_to_multiple_of=8)
    assert packed([8, 8, 16, 16, 16]) == 64
    assert cut_to_budget(lengths, 64, packed) == [5, 1, 1]
    # A row is padded to a multiple of 8, but never past the row length.
    assert packed_tokens([5, 6], 30, 8) == 16
    assert packed_tokens([14, 15], 30, 8) == 30
    assert cut_to_budget([], 48, padded) == []


@pytest.fixture(scope="module")
def lengths(tiny_model_dir) -> list[int]:
    dm = FinSightDataModule(sources=sample_sources(), tokenizer=str(tiny_model_dir), max_length=MAX_LENGTH,
                            num_proc=1)
    dm.setup("fit")
    return dm._train_lengths


def batch_cost(batch: list[int], lengths: list[int], packing: bool) -> int:
    """The tensor the collator builds for the batch: packed rows, counted on the tensor itself, or rows padded
    to the longest, rounded up to 8."""
    if not packing:
        return len(batch) * -(-max(lengths[i] for i in batch) // 8) * 8
    rows = [{"input_ids": [1] * lengths[i], "labels": [1] * lengths[i]} for i in batch]
    return PackingCollator(0, MAX_LENGTH)(rows)["input_ids"].numel()


@pytest.mark.parametrize("packing", [False, True])
def test_every_epoch_trains_every_sample_once_within_the_budget(lengths, packing):
    sampler = TokenBudgetBatchSampler(lengths, BUDGET, seed=3, packed_row_length=MAX_LENGTH if packing else None)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)  # the same count every epoch: what Lightning reads once
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(batch_cost(batch, lengths, packing) <= BUDGET for batch in batches)
        assert max(lengths) == max(lengths[i] for i in batches[0])  # the longest sample first
        epochs.append(batches)
    # Filled: on average a micro-batch uses most of its budget.
    used = sum(batch_cost(b, lengths, packing) for b in epochs[0]) / (len(epochs[0]) * BUDGET)
    assert used > 0.8
    # Another epoch, another order and other partners for samples of equal length.
    assert epochs[0] != epochs[1]
    assert {tuple(sorted(b)) for b in epochs[0]} != {tuple(sorted(b)) for b in epochs[1]}
    # A pure function of (seed, epoch).
    again = TokenBudgetBatchSampler(lengths, BUDGET, seed=3, packed_row_length=MAX_LENGTH if packing else None)
    again.set_epoch(1)
    assert list(again) == epochs[1]


def test_a_fresh_sampler_continues_a_half_drawn_epoch(lengths):
    sampler = TokenBudgetBatchSampler(lengths, BUDGET, seed=3)
    sampler.set_epoch(1)
    whole = list(sampler)
    iterator = iter(sampler)
    drawn = [next(iterator) for _ in range(5)]
    fresh = TokenBudgetBatchSampler(lengths, BUDGET, seed=3)
    fresh.load_state_dict(sampler.state_dict())
    assert drawn + list(fresh) == whole


@pytest.mark.parametrize("world_size, accumulation", [(1, 3), (2, 2), (3, 1)])
def test_ranks_take_whole_micro_batches_in_turn_with_the_step_totals(lengths, world_size, accumulation):
    trained = [length // 2 + i % 5 for i, length in enumerate(lengths)]  # any per-sample counts
    per_rank = []
    for rank in range(world_size):
        sampler = TokenBudgetBatchSampler(lengths, BUDGET, seed=0)
        sampler.step_tokens = StepTokens(trained, 1, accumulation, world_size)
        per_rank.append(list(distributed_sampler(sampler, num_replicas=world_size, rank=rank, shuffle=False)))
    # Every rank runs as many micro-batches (a rank short of one would hang DDP), each within the budget.
    assert len({len(batches) for batches in per_rank}) == 1
    order = TokenBudgetBatchSampler(lengths, BUDGET, seed=0)
    plain = list(order)
    padded = StepTokens(trained, 1, accumulation, world_size).pad(plain)
    for position, batch in enumerate(padded):
        keys = per_rank[position % world_size][position // world_size]
        assert [index for index, _ in keys] == batch
    # A step's total is the sum over its accumulation window on every rank.
    steps = len(per_rank[0]) // accumulation + bool(len(per_rank[0]) % accumulation)
    for step in range(steps):
        window = [keys for batches in per_rank for keys in batches[step * accumulation:(step + 1) * accumulation]]
        expected = sum(trained[index] for keys in window for index, _ in keys)
        assert {total for keys in window for _, total in keys} == {expected}
    # Balanced: the ranks' padded tokens differ by less than a tenth.
    tokens = [sum(batch_cost([i for i, _ in keys], lengths, False) for keys in batches) for batches in per_rank]
    assert max(tokens) < 1.1 * min(tokens)


@pytest.mark.parametrize("packing", [False, True])
def test_the_loader_hands_over_micro_batches_within_the_budget(tiny_model_dir, packing):
    dm = FinSightDataModule(sources=sample_sources(), tokenizer=str(tiny_model_dir), max_length=MAX_LENGTH,
                            num_proc=1, batch_tokens=BUDGET, packing=packing)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader)
    conversations = 0
    for batch in batches:
        assert batch["input_ids"].numel() <= BUDGET
        conversations += len(batch[CONVERSATION_LENGTHS]) if packing else len(batch["input_ids"])
        trained = int((batch["labels"][:, 1:] != -100).sum())
        assert batch[STEP_TOKENS].tolist() == [trained] * len(batch["sample_id"])
    assert conversations == len(dm.train_dataset)
    assert sorted(i for b in batches for i in b["sample_id"].tolist()) == list(range(len(dm.train_dataset)))
    assert len({len(b["sample_id"]) for b in batches}) > 1  # micro-batches of different sizes


def test_settings_that_cannot_work_are_one_clear_error(tiny_model_dir):
    with pytest.raises(DataSourceError, match=r"batch_tokens=100 is less than data.max_length=256"):
        FinSightDataModule(tokenizer=str(tiny_model_dir), max_length=256, batch_tokens=100)
    with pytest.raises(DataSourceError, match=r"leave data.group_by_length true"):
        FinSightDataModule(tokenizer=str(tiny_model_dir), batch_tokens=2048, group_by_length=False)


def test_the_step_gradient_of_unequal_micro_batches_equals_one_big_batch(tiny_model_dir, monkeypatch):
    """The real 4-bit QLoRA step over an accumulation window of two micro-batches of different sizes: the
    loss and every LoRA gradient equal those of one padded batch of all their conversations."""
    dm = FinSightDataModule(sources=sample_sources(), tokenizer=str(tiny_model_dir), max_length=MAX_LENGTH,
                            num_proc=1, batch_tokens=512)
    dm.setup("fit")
    sampler = TokenBudgetBatchSampler(dm._train_lengths, 512, seed=dm.seed)
    sampler.step_tokens = StepTokens(dm._train_trained, 1, accumulation=2)
    rows = WithStepTokens(dm.train_dataset.with_format(columns=["input_ids", "labels", "source_index",
                                                                "sample_id"]))
    collate = FinSightCollator(dm.tokenizer)
    order = list(sampler)
    # The first optimizer step whose two micro-batches differ in size: both carry the step's total.
    first, second = next((order[k], order[k + 1]) for k in range(0, len(order) - 1, 2)
                         if len(order[k]) != len(order[k + 1]))
    window = [collate(rows[first]), collate(rows[second])]
    assert len(window[0]["input_ids"]) != len(window[1]["input_ids"])
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    assert {int(t) for b in window for t in b[STEP_TOKENS]} == {total}
    everything = collate([row for keys in (first, second) for row in rows[keys]])
    del everything[STEP_TOKENS]

    module = qlora_module_for_gradients(tiny_model_dir, monkeypatch)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}

    module.zero_grad()
    for batch in window:
        module.training_step(batch, 0).backward()
    accumulated = {n: p.grad.clone() for n, p in trainable.items()}
    module.zero_grad()
    module.training_step(everything, 0).backward()  # its own token mean
    assert len(accumulated) > 0
    for name, param in trainable.items():
        torch.testing.assert_close(accumulated[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_fit_with_a_token_budget_trains_every_sample_once_and_counts_its_steps(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    """The CLI with --data.batch_tokens and accumulation over an epoch: every sample once, Lightning's step count
    and the learning-rate schedule sized from the loader's micro-batch count, conversations counted."""
    recorder = {"class_path": "fit_worker.SampleRecorder", "init_args": {"out_dir": str(tmp_path)}}
    out = io.StringIO()
    monkeypatch.setattr("finsight.training.monitoring.Console", lambda **kwargs: Console(file=out, width=400))
    cli = main(tiny_fit_args(
        tiny_model_dir, tmp_path, "--trainer.max_steps=-1", "--trainer.max_epochs=1",
        "--trainer.val_check_interval=1.0", "--trainer.accumulate_grad_batches=2", "--data.batch_tokens=2048",
        "--model.quantization=none", "--model.gradient_checkpointing=false",  # speed only: not what is tested
        f"--trainer.callbacks+={json.dumps(recorder)}"))
    record = json.loads((tmp_path / "run-rank0.json").read_text())
    consumed = [i for batch in record["batches"] for i in batch]
    assert sorted(consumed) == list(range(len(record["lengths"])))
    micro_batches = len(cli.datamodule.train_dataloader())
    assert len(record["batches"]) == micro_batches > 2
    assert len({len(batch) for batch in record["batches"]}) > 1
    assert all(len(batch) * -(-max(record["lengths"][i] for i in batch) // 8) * 8 <= 2048
               for batch in record["batches"])
    assert cli.trainer.global_step == math.ceil(micro_batches / 2)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == cli.trainer.global_step
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # the decay ends exactly at the last step
    samples = tensorboard_scalars(cli.trainer.log_dir, "perf/samples_per_s")
    seconds = tensorboard_scalars(cli.trainer.log_dir, "perf/step_seconds")
    counted = sum(samples[step] * seconds[step] for step in samples)
    assert counted == pytest.approx(len(consumed), rel=1e-3)  # every conversation counted once
    summary = out.getvalue()
    average = len(consumed) / micro_batches
    assert "4,096 tokens at most = micro-batch of 2,048 tokens × accumulation 2 × 1 device(s);" in summary
    assert f"{average:.1f} conversations per" in summary
