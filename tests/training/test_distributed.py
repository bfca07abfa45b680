"""DDP on CPU: two real processes (gloo) run the quickstart config on the tiny model with no code change.

The ranks must split the epoch (disjoint, together complete, each in the length-grouped order), prepare the
data once, log and checkpoint on rank 0 only, report validation metrics reduced over both ranks, and resume
mid-epoch from ``--ckpt_path last``. Lightning's ddp strategy re-runs the command for rank 1, so the runs are
real ``python -m finsight fit`` subprocesses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from helpers import TESTS, run_finsight, run_ranks, tiny_fit_args

from finsight.data.batching import EpochLengthGroupedSampler

BATCH = 4
SEED = 42
# One small bundled source keeps the run short: 40 identity chats, 36 train / 4 validation.
SOURCES = '[{"name": "intro", "format": "intro", "rows": 40}]'
DDP_TIMEOUT_S = 480


def recorder_arg(out_dir: Path, tag: str) -> str:
    """``--trainer.callbacks+=`` adding a SampleRecorder (importable in the subprocess through PYTHONPATH)."""
    spec = {"class_path": "fit_worker.SampleRecorder", "init_args": {"out_dir": str(out_dir), "tag": tag}}
    return f"--trainer.callbacks+={json.dumps(spec)}"


def expected_rank_orders(lengths: list[int], world_size: int = 2) -> list[list[int]]:
    """Each rank's share of epoch 0: the length-grouped order, padded to a multiple of the world size with its
    first samples (DistributedSampler's rule), every world_size-th sample from the rank's offset."""
    order = list(EpochLengthGroupedSampler(lengths, BATCH, SEED))
    total = math.ceil(len(order) / world_size) * world_size
    padded = order + order[: total - len(order)]
    return [padded[rank::world_size] for rank in range(world_size)]


@pytest.fixture(scope="module")
def ddp_runs(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """A 2-process DDP run stopped after 2 optimizer steps, then resumed with ``--ckpt_path last``."""
    root = tmp_path_factory.mktemp("ddp")
    cache = tmp_path_factory.getbasetemp() / "finsight-cache"
    common = [
        "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=null",
        "--trainer.logger.init_args.version=ddp",  # the resumed run must find last.ckpt in the same folder
        f"--data.batch_size={BATCH}", "--data.val_fraction=0.1", f"--data.seed={SEED}", f"--data.sources={SOURCES}",
    ]
    first = run_finsight(tiny_fit_args(tiny_model_dir, root, *common, "--trainer.max_steps=2",
                                       recorder_arg(root / "out", "first")), cache)
    log_dir = root / "lightning_logs" / "quickstart" / "ddp"
    files_after_first = sorted(str(p.relative_to(log_dir)) for p in log_dir.rglob("*") if p.is_file())
    resumed = run_finsight(tiny_fit_args(tiny_model_dir, root, *common, "--trainer.max_steps=-1",
                                         "--ckpt_path=last", recorder_arg(root / "out", "resumed")), cache)
    records = {tag: [json.loads((root / "out" / f"{tag}-rank{rank}.json").read_text()) for rank in (0, 1)]
               for tag in ("first", "resumed")}
    return {"first": first, "resumed": resumed, "records": records, "log_dir": log_dir,
            "files_after_first": files_after_first}


@pytest.mark.slow
def test_ranks_split_the_epoch_in_length_grouped_order(ddp_runs):
    first, resumed = ddp_runs["records"]["first"], ddp_runs["records"]["resumed"]
    lengths = first[0]["lengths"]
    assert len(lengths) == 36 and first[1]["lengths"] == lengths
    expected = expected_rank_orders(lengths)
    for rank in (0, 1):
        info = first[rank]
        assert (info["rank"], info["world_size"]) == (rank, 2)
        # The data module's loader class survives, sharded by the data module itself (no reshuffling).
        assert info["loader"] == "StatefulDataLoader"
        assert info["sampler"] == "DistributedSamplerWrapper" and info["shuffle"] is False
        assert info["inner_sampler"] == "EpochLengthGroupedSampler" and info["batch_size"] == BATCH
        assert info["global_step"] == 2 and [len(b) for b in info["batches"]] == [BATCH, BATCH]
        consumed = [i for b in info["batches"] + resumed[rank]["batches"] for i in b]
        assert consumed == expected[rank]  # the first run, then the resumed one, in this rank's order
        assert resumed[rank]["global_step"] == math.ceil(len(expected[rank]) / BATCH)
    seen = [{i for b in first[r]["batches"] + resumed[r]["batches"] for i in b} for r in (0, 1)]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(36))
    assert [len(s) for s in seen] == [18, 18]


@pytest.mark.slow
def test_data_is_prepared_once_and_outputs_are_written_by_rank_zero(ddp_runs):
    first_output, resumed_output = ddp_runs["first"], ddp_runs["resumed"]
    # Rank 0 builds the cache; rank 1 waits at Lightning's setup barrier and only loads it.
    assert first_output.count("Prepared data in") == 1
    assert resumed_output.count("Prepared data in") == 0 and resumed_output.count("Prepared data found") == 1
    files = ddp_runs["files_after_first"]
    events = [f for f in files if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    rank0_pid = ddp_runs["records"]["first"][0]["pid"]
    assert events[0].split(".")[-2] == str(rank0_pid)  # TensorBoard names its file after the writing process
    assert "checkpoints/last.ckpt" in files and len([f for f in files if f.startswith("checkpoints/")]) == 2
    assert "adapter/adapter_model.safetensors" in files and "config.yaml" in files
    assert first_output.count("Adapter written to") == 1


@pytest.mark.slow
def test_validation_metrics_are_reduced_over_both_ranks(ddp_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = ddp_runs["records"]["first"]
    # Each rank validates a different half of the split; torchmetrics' compute() syncs the token-weighted
    # sums, so both ranks log the same global value (sync_dist=False in the module is right).
    assert len(first[0]["val_loss"]) == 1
    assert first[0]["val_loss"] == first[1]["val_loss"]
    event_file = next(ddp_runs["log_dir"].glob(f"events.out.tfevents.*.{first[0]['pid']}.*"))
    accumulator = EventAccumulator(str(event_file))
    accumulator.Reload()
    logged = [event.value for event in accumulator.Scalars("val/loss")]
    assert logged == pytest.approx(first[0]["val_loss"])


def test_data_module_shards_the_grouped_order_per_rank(tiny_tokenizer, tmp_path):
    """In-process, with a real DDP Trainer's rank settings: rank r's loader yields every 2nd sample of the
    length-grouped order, so batches stay length-grouped (Lightning's own wrapper would reshuffle them)."""
    from helpers import sample_sources
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from finsight.data.datamodule import FinSightDataModule
    from finsight.data.quality import padding_efficiency

    dm = FinSightDataModule(sources=sample_sources(), tokenizer=tiny_tokenizer, max_length=256,
                            batch_size=BATCH, seed=SEED, num_proc=1)
    dm.setup("fit")
    lengths = dm._train_lengths
    expected = expected_rank_orders(lengths)
    for rank in (0, 1):
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)
        # What the DDP launch sets in each process (without starting processes).
        environment = trainer.strategy.cluster_environment
        environment.set_world_size(2)
        environment.set_global_rank(rank)
        rank_zero_only.rank = 0  # set_global_rank also silences rank-zero logging for the rest of the session
        assert (trainer.global_rank, trainer.world_size) == (rank, 2)
        dm.trainer = trainer
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSamplerWrapper) and loader.sampler.shuffle is False
        consumed = [i for batch in loader for i in batch["sample_id"].tolist()]
        assert consumed == expected[rank]
        # What Lightning would have done: the same order, reshuffled sample by sample.
        # (The order's entries are (index, optimizer-step token total) pairs, see StepTokens.)
        lightning_default = [index for index, _ in DistributedSamplerWrapper(
            dm.train_sampler().dataset._sampler, num_replicas=2, rank=rank, shuffle=True, seed=SEED)]
        ours = padding_efficiency(lengths, consumed, BATCH, dm.pad_to_multiple_of)
        theirs = padding_efficiency(lengths, lightning_default, BATCH, dm.pad_to_multiple_of)
        assert ours > theirs + 0.05, (ours, theirs)
    dm.trainer = None
    assert type(dm.train_sampler()) is EpochLengthGroupedSampler  # one process: unchanged


@pytest.mark.parametrize("logger", ["tensorboard", "csv", "none"])
def test_rank_zero_log_dir_matches_the_trainers_without_a_collective(logger, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from finsight.run_dir import rank_zero_log_dir

    loggers = {"tensorboard": TensorBoardLogger(tmp_path, name="tb"), "csv": CSVLogger(tmp_path, name="csv"),
               "none": False}
    trainer = L.Trainer(accelerator="cpu", logger=loggers[logger], default_root_dir=tmp_path / "root")
    assert rank_zero_log_dir(trainer) == trainer.log_dir
    assert rank_zero_log_dir(trainer) == {"tensorboard": str(tmp_path / "tb" / "version_0"),
                                          "csv": str(tmp_path / "csv" / "version_0"),
                                          "none": str(tmp_path / "root")}[logger]


# Two sources; with the tiny tokenizer the validation split is 4 rows in length order [intro, intro, company_qa,
# intro]: DDP gives rank 0 rows 0 and 2 and rank 1 rows 1 and 3, so rank 1 never sees company_qa.
TWO_SOURCES = ('[{"name": "intro", "format": "intro", "rows": 30}, '
               '{"name": "company_qa", "path": "bundled:company_qa", "format": "qa", "fraction": 0.08}]')
TWO_SOURCE_DATA = {"sources": TWO_SOURCES, "batch_size": 2, "val_fraction": 0.1, "seed": SEED, "max_length": 512}
FIT_VALIDATE_TEST_TIMEOUT_S = 300


def test_fit_validate_test_on_two_ranks_when_one_rank_lacks_a_source(tiny_model_dir, tmp_path_factory, tmp_path):
    """fit + validate + test under DDP (2 CPU processes, gloo) through the CLI's objects: every rank makes the same
    collective calls (a hang fails after the timeout), per-source losses equal a single-process computation, and
    rank 0 alone writes the results and the adapter."""
    from finsight.data.datamodule import FinSightDataModule
    from finsight.evaluation.metrics import BASE, FINE_TUNED
    from finsight.training.module import FinSightModule

    cache = tmp_path_factory.getbasetemp() / "finsight-cache"
    out = tmp_path / "out"
    args = tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2",
                         "--trainer.limit_val_batches=null", "--trainer.logger.init_args.version=ddp",
                         "--model.lora_r=8", "--eval.compare_base=true", "--eval.max_samples=1",
                         "--eval.max_new_tokens=4", *(f"--data.{k}={v}" for k, v in TWO_SOURCE_DATA.items()))[1:]
    output = run_ranks([str(TESTS / "ddp_worker.py"), str(out), *args], cache, FIT_VALIDATE_TEST_TIMEOUT_S)
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    names = ranks[0]["source_names"]
    assert names == ["intro", "company_qa"] and [r["world_size"] for r in ranks] == [2, 2]
    # The situation under test: company_qa's only validation row is on rank 0.
    for stage in ("fit", "validate"):
        assert ranks[0]["val_sources"][stage] == [0, 1] and ranks[1]["val_sources"][stage] == [0], stage

    # Both ranks log the same globally reduced values, in fit's validation and in validate.
    for stage in ("fit", "validate"):
        values = [{k: v for k, v in r[stage].items() if k.startswith("val/")} for r in ranks]
        assert {"val/loss", "val/ppl", "val/loss/intro", "val/loss/company_qa"} <= set(values[0]), stage
        assert values[0] == values[1], stage

    # The same weights and rows in one process give the same per-source losses.
    module = FinSightModule.from_checkpoint(out / "final.ckpt")
    data = FinSightDataModule(tokenizer=str(tiny_model_dir), num_proc=1, **{**TWO_SOURCE_DATA, "sources":
                                                                            json.loads(TWO_SOURCES)})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path / "single")
    single = trainer.validate(module, datamodule=data, verbose=False)[0]
    for key in ("val/loss", "val/loss/intro", "val/loss/company_qa", "val/ppl"):
        assert ranks[0]["validate"][key] == pytest.approx(single[key], rel=1e-4), key

    # test: the same held-out rows, so the same loss; the base model row too; results written once, by rank 0.
    for r in ranks:
        assert r["test"]["test/loss"] == pytest.approx(single["val/loss"], rel=1e-4)
        assert r["test"]["test_base/loss"] > 0 and "test/rouge_l" in r["test"]
        assert r["test"]["test_base/loss"] == ranks[0]["test"]["test_base/loss"]
    log_dir = Path(ranks[0]["log_dir"])
    assert ranks[1]["log_dir"] == str(log_dir)
    results = sorted(tmp_path.rglob("eval_results.json"))
    assert results == [log_dir / "eval_results.json"]
    written = json.loads(results[0].read_text())
    assert set(written["rows"]) == {FINE_TUNED, BASE}
    assert written["rows"][FINE_TUNED]["loss"] == pytest.approx(ranks[0]["test"]["test/loss"])
    # max_samples=1 goes to the first source with validation rows: intro, the identity source.
    assert written["settings"]["questions_per_source"] == {"intro": 1}
    assert written["settings"]["identity_prompts"] == 1 and written["settings"]["questions"] == 0
    assert output.count("Results:") == 1 and output.count("Adapter written to") == 1
    assert (log_dir / "adapter" / "adapter_model.safetensors").is_file()
