"""``FinSightDataModule`` end to end on the bundled samples: report, cache, determinism, batches, resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import rows_of, sample_sources, write_jsonl

from finsight import FinSightDataModule
from finsight.data import quality

SETTINGS = {"batch_size": 4, "max_length": 512, "val_fraction": 0.05, "seed": 42}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


def make(tokenizer, cache: Path, **overrides) -> FinSightDataModule:
    """The quickstart's mixture (reddit at 0.67) with the test tokenizer."""
    return FinSightDataModule(sources=sample_sources(), tokenizer=tokenizer, cache_dir=str(cache),
                              **{**SETTINGS, **overrides})


@pytest.fixture(scope="module")
def bundled(tiny_tokenizer, cache) -> FinSightDataModule:
    dm = make(tiny_tokenizer, cache)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_report_counts_follow_the_fractions(bundled):
    report = bundled.report
    expected_valid = {"reddit_finance": 216, "company_qa": 143}
    fractions = {s["name"]: s["fraction"] for s in sample_sources()}
    for s in report.sources:
        assert s.rows_read == s.valid + sum(v for k, v in s.dropped.items() if k != quality.NO_TRAINED_TOKENS)
        if s.name in expected_valid:
            assert s.valid == expected_valid[s.name]
        assert s.kept_after_fraction == round(s.valid * fractions[s.name])
        assert s.kept_after_fraction == s.train + s.val + s.dropped.get(quality.NO_TRAINED_TOKENS, 0)
        assert s.val == min(bundled.val_max_rows, round(0.05 * s.kept_after_fraction))
        assert s.tokens > s.trained_tokens > 0 and s.length_max <= 512
    assert report.source("reddit_finance").kept_after_fraction == 145  # 216 × 0.67 = 144.72
    assert report.source("intro").rows_read == 40

    # The prepared splits hold exactly what the report says, per source.
    names = bundled.source_names
    for split, dataset in (("train", bundled.train_dataset), ("val", bundled.val_dataset)):
        rows = rows_of(dataset)
        assert [r["sample_id"] for r in rows] == list(range(len(rows)))
        for index, name in enumerate(names):
            assert sum(r["source_index"] == index for r in rows) == getattr(report.source(name), split)
    # Validation: the first loader batches cover every source (limit_val_batches >= 3 sees all three), and
    # each source's rows come in batches of similar length.
    val = rows_of(bundled.val_dataset)
    loader_batches = [val[i : i + 4] for i in range(0, len(val), 4)]
    assert {r["source_index"] for batch in loader_batches[:3] for r in batch} == {0, 1, 2}
    assert len({r["source_index"] for r in loader_batches[0]}) == 1
    for index, name in enumerate(names):
        lengths = [r["length"] for r in val if r["source_index"] == index]
        assert len(lengths) == report.source(name).val


def test_report_json_round_trip_and_table(bundled, tmp_path):
    path = bundled.report.save(tmp_path / "nested" / "data_report.json")
    loaded = quality.DataReport.load(path)
    assert loaded == bundled.report
    assert loaded.to_dict() == bundled.report.to_dict()
    assert loaded.source("company_qa").dropped == bundled.report.source("company_qa").dropped

    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bundled.report.table().rich())
    text = console.export_text()
    assert "reddit_finance" in text and "empty_turn=9" in text and "0.9" in text
    assert "| company_qa | 160 |" in bundled.report.markdown()


def test_padding_efficiency_of_grouped_batches(bundled):
    report = bundled.report
    assert report.batch_size == 4
    assert report.padding_efficiency_grouped >= 0.90
    assert report.padding_efficiency_grouped > report.padding_efficiency_random + 0.1
    # The report's number is what the training loader's first epoch really does.
    real = total = 0
    for batch in bundled.train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    assert round(real / total, 4) == report.padding_efficiency_grouped


def test_second_datamodule_reuses_the_cache(bundled, tiny_tokenizer, cache):
    assert bundled.from_cache is False
    target = bundled._cache_path()
    stamps = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    again = make(tiny_tokenizer, cache)
    assert again.fingerprint() == bundled.fingerprint()
    again.prepare_data()
    again.setup("fit")
    assert again.from_cache is True
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == stamps
    assert rows_of(again.train_dataset) == rows_of(bundled.train_dataset)
    assert sorted(p.name for p in cache.iterdir()) == [target.name]  # nothing half-written left behind
    assert make(tiny_tokenizer, cache, max_length=256).fingerprint() != bundled.fingerprint()


def test_fingerprint_ignores_tokenizer_call_settings_but_not_the_vocabulary(tiny_tokenizer, cache):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    before = make(tokenizer, cache).fingerprint()
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_length=7)
    backend.enable_padding(length=9, pad_id=0)
    assert make(tokenizer, cache).fingerprint() == before
    # The call settings are put back as they were.
    assert backend.truncation["max_length"] == 7 and backend.padding["length"] == 9
    tokenizer.add_tokens(["<|ticker|>"])
    assert make(tokenizer, cache).fingerprint() != before


def test_merging_is_deterministic_for_a_seed(bundled, tiny_tokenizer, tmp_path):
    other = make(tiny_tokenizer, tmp_path / "elsewhere")
    other.setup("fit")
    assert other.from_cache is False
    assert rows_of(other.train_dataset) == rows_of(bundled.train_dataset)
    assert rows_of(other.val_dataset) == rows_of(bundled.val_dataset)
    assert other.report == bundled.report


def test_validation_rows_are_capped_per_source(tiny_tokenizer, tmp_path):
    dm = make(tiny_tokenizer, tmp_path, val_fraction=0.5, val_max_rows=3)
    dm.setup("fit")
    for s in dm.report.sources:
        assert s.val == 3
        assert s.train == s.kept_after_fraction - 3 - s.dropped.get(quality.NO_TRAINED_TOKENS, 0)


def sample_ids(batches) -> list[int]:
    return [i for batch in batches for i in batch["sample_id"].tolist()]


@pytest.mark.parametrize(
    ("epoch", "num_workers", "grouped", "lightning_sets_epoch"),
    [(0, 0, True, False), (2, 0, True, False), (2, 0, True, True), (1, 1, True, True), (3, 0, False, False)],
    ids=["epoch0", "epoch2", "epoch2-set_epoch-first", "epoch1-one-worker", "epoch3-random-order"],
)
def test_train_loader_resumes_mid_epoch(bundled, tiny_tokenizer, cache, epoch, num_workers, grouped,
                                        lightning_sets_epoch):
    dm = make(tiny_tokenizer, cache, num_workers=num_workers, group_by_length=grouped)
    loader = dm.train_dataloader()
    assert loader.pin_memory is torch.cuda.is_available()
    loader.sampler.set_epoch(epoch)
    full = sample_ids(loader)
    assert sorted(full) == list(range(len(bundled.train_dataset)))
    if epoch:
        loader.sampler.set_epoch(0)
        assert sample_ids(loader) != full  # each epoch has its own order
        loader.sampler.set_epoch(epoch)

    k = 7
    iterator = iter(loader)
    consumed = sample_ids(next(iterator) for _ in range(k))
    state = loader.state_dict()
    del iterator

    fresh = make(tiny_tokenizer, cache, num_workers=num_workers, group_by_length=grouped).train_dataloader()
    if lightning_sets_epoch:
        fresh.sampler.set_epoch(epoch)  # Lightning sets the epoch before it iterates a restored loader
    fresh.load_state_dict(state)
    rest = sample_ids(fresh)
    assert consumed == full[: len(consumed)] and len(consumed) == k * 4
    assert consumed + rest == full  # no repeat, no skip, same order
    # The next epoch after the resumed one starts from its beginning.
    fresh.sampler.set_epoch(epoch + 1)
    assert sorted(sample_ids(fresh)) == sorted(full)


def test_report_is_saved_beside_the_logs_and_logged_to_tensorboard(tiny_tokenizer, cache, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = L.Trainer(logger=TensorBoardLogger(tmp_path, name="run"), accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False)
    dm = make(tiny_tokenizer, cache)
    dm.trainer = trainer
    dm.setup("fit")
    saved = Path(trainer.log_dir) / "data_report.json"
    assert quality.DataReport.load(saved) == dm.report
    trainer.logger.experiment.flush()
    events = EventAccumulator(str(next(Path(trainer.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "data/padding_efficiency_grouped" in scalars and "data/reddit_finance/train" in scalars
    train = events.Scalars("data/reddit_finance/train")[0].value
    assert train == dm.report.source("reddit_finance").train
    assert "data/report/text_summary" in events.Tags()["tensors"]


class Recorder(L.LightningModule):
    """Trains a single weight and records which samples each training step saw."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["sample_id"].tolist())
        return (self.weight * batch["attention_mask"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_resumes_mid_epoch_with_the_same_batches(tiny_tokenizer, cache, tmp_path):
    """A real Lightning resume inside the second epoch sees exactly the batches the unbroken run saw."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(root: Path, *callbacks) -> L.Trainer:
        return L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks),
                         enable_checkpointing=bool(callbacks))

    settings = {"batch_size": 16}
    unbroken = Recorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=27, save_top_k=-1,
                                  filename="{step}")
    trainer(tmp_path, checkpoints).fit(unbroken, datamodule=make(tiny_tokenizer, cache, **settings))
    per_epoch = len(unbroken.seen) // 2
    assert 16 < 27 < 2 * per_epoch and len(unbroken.seen) == 2 * per_epoch  # the checkpoint is mid epoch 2

    resumed = Recorder()
    trainer(tmp_path / "again").fit(resumed, datamodule=make(tiny_tokenizer, cache, **settings),
                                    ckpt_path=tmp_path / "ckpt" / "step=27.ckpt")
    assert resumed.seen == unbroken.seen[27:]
    first, second = unbroken.seen[:per_epoch], unbroken.seen[per_epoch:]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) and first != second


def test_worker_processes_tokenize_exactly_like_one_process(tiny_tokenizer, tmp_path):
    # 3,000 distinct conversations of varied length in two formats: enough rows for two tokenizing workers.
    words = "net revenue rose in the segment while operating costs fell and margins improved".split()
    qa = [{"question": f"What happened to segment {i} in fiscal {2019 + i % 5}?",
           "answer": " ".join(words[: 3 + i % 11] * (1 + i % 7)) + f" ({i})."} for i in range(1000)]
    chats = [{"messages": [{"role": "user", "content": f"Explain term {i}: " + " ".join(words[: 1 + i % 13])},
                           {"role": "assistant", "content": " ".join(words * (1 + i % 9)) + f" ({i})."}]}
             for i in range(2000)]
    sources = [{"name": "qa", "path": str(write_jsonl(tmp_path / "qa.jsonl", qa)), "format": "qa"},
               {"name": "chats", "path": str(write_jsonl(tmp_path / "chats.jsonl", chats)), "format": "messages"}]
    prepared = {}
    for num_proc in (1, 2):
        dm = FinSightDataModule(sources=sources, tokenizer=tiny_tokenizer, num_proc=num_proc, max_length=256,
                                cache_dir=str(tmp_path / f"cache-{num_proc}"))
        assert dm._num_proc(2400) == (2 if num_proc == 2 else None)
        assert dm._num_proc(400) is None  # the validation split is too small for a pool of workers
        dm.setup("fit")
        prepared[num_proc] = (rows_of(dm.train_dataset), rows_of(dm.val_dataset), dm.report)
    assert len(prepared[1][0]) > 2000
    assert prepared[1] == prepared[2]
