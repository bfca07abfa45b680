"""``FinSightDataModule``: sources → checked conversations → fraction sample → per-source validation split →
chat template with assistant-only labels → cached ``datasets`` → length-grouped, stateful batches.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from finsight.data import quality
from finsight.data.batching import EpochLengthGroupedSampler, FinSightCollator
from finsight.data.chat import ChatEncoder
from finsight.data.sources import (
    DEFAULT_SYSTEM_PROMPT,
    DataSourceError,
    SourceConfig,
    check_columns,
    conversations,
    default_sources,
    read_source,
)

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when the processing changes, so old caches are not reused


class FinSightDataModule(L.LightningDataModule):
    """The finance conversation mixture, ready for causal-LM fine-tuning.

    Usable on its own: ``dm = FinSightDataModule(sources=[...], tokenizer=tok); dm.prepare_data();
    dm.setup("fit")``. The expensive work (reading, checks, tokenization) happens once in ``prepare_data``
    and is cached on disk by a fingerprint of everything that affects it; ``setup`` only loads the cache.
    """

    def __init__(
        self,
        sources: list[SourceConfig] | None = None,
        tokenizer: str | Any | None = None,
        max_length: int = 1024,
        batch_size: int = 4,
        val_fraction: float = 0.05,
        val_max_rows: int = 200,
        seed: int = 42,
        num_proc: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = 8,
        group_by_length: bool = True,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            sources: The mixture: each ``{name, path, format, fraction}``. Defaults to the methodology's
                reddit_finance (0.67), company_qa (1.0) and intro (1.0) on the Hub.
            tokenizer: Model reference whose tokenizer and chat template are used (linked from
                ``model.model_name`` on the command line), or a tokenizer object in Python.
            max_length: Tokens per sample; longer samples are truncated, and a sample left with no
                trained token is dropped and counted. Higher: more context and memory.
            batch_size: Micro-batch size per device (the optimizer sees ``batch_size`` × accumulation
                × devices samples per step).
            val_fraction: Share of each source held out for validation.
            val_max_rows: Cap on validation rows per source, so validation stays cheap on large sources.
            seed: Seed of fraction sampling, validation split, merge order and batch order.
            num_proc: Processes for tokenization (``datasets.map``); None picks by data size and CPUs.
            num_workers: DataLoader worker processes.
            pad_to_multiple_of: Pad each batch's length up to a multiple of this (8 suits tensor cores);
                None pads to the longest sample exactly.
            group_by_length: Batch samples of similar length together (shuffled mega-batches sorted by
                length), which keeps padding low; False gives plain random batches.
            system_prompt: System prompt given to every conversation that has none of its own.
            cache_dir: Where prepared data is cached; defaults to ``~/.cache/finsight/data``.
        """
        super().__init__()
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in
                        (sources if sources is not None else default_sources())]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataSourceError(f"source names must be unique, got {names}")
        if not self.sources:
            raise DataSourceError("at least one source is needed")
        self.tokenizer_ref = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.val_max_rows = val_max_rows
        self.seed = seed
        self.num_proc = num_proc
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.system_prompt = system_prompt
        self.cache_dir = cache_dir
        self._tokenizer: Any = None
        self.train_dataset = None
        self.val_dataset = None
        self.report: quality.DataReport | None = None
        self._report_logged = False

    # ------------------------------------------------------------------------------------- identity

    @property
    def source_names(self) -> list[str]:
        """Source names in ``source_index`` order."""
        return [s.name for s in self.sources]

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use (so parsing a config never loads one)."""
        if self._tokenizer is None:
            if self.tokenizer_ref is None:
                raise DataSourceError("FinSightDataModule needs a tokenizer (a model reference or object)")
            if isinstance(self.tokenizer_ref, str):
                from finsight.model import load_tokenizer, resolve_model

                self._tokenizer = load_tokenizer(resolve_model(self.tokenizer_ref))
            else:
                self._tokenizer = self.tokenizer_ref
                if self._tokenizer.pad_token is None:
                    self._tokenizer.pad_token = self._tokenizer.unk_token or self._tokenizer.eos_token
        return self._tokenizer

    def fingerprint(self) -> str:
        """Hash of everything that changes the prepared data: sources and their files, tokenizer,
        template, length and split settings."""
        from datasets.fingerprint import Hasher

        files = []
        for s in self.sources:
            from finsight.data.sources import resolve_path

            path = Path(resolve_path(s.path)).expanduser() if s.path else None
            if path is not None and path.exists():
                stat = path.stat()
                files.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
            else:
                files.append(s.path)
        tok = self.tokenizer
        identity = {
            "version": PIPELINE_VERSION,
            "sources": [s.to_dict() for s in self.sources],
            "files": files,
            "tokenizer": (getattr(tok, "name_or_path", ""), tok.chat_template, len(tok),
                          Hasher.hash(tok.get_vocab()) if hasattr(tok, "get_vocab") else ""),
            "settings": (self.max_length, self.val_fraction, self.val_max_rows, self.seed, self.system_prompt,
                         self.batch_size, self.pad_to_multiple_of),
        }
        return Hasher.hash(identity)

    def _cache_path(self) -> Path:
        from finsight.model import cache_root

        root = Path(self.cache_dir).expanduser() if self.cache_dir else cache_root() / "data"
        return root / self.fingerprint()

    # ------------------------------------------------------------------------------------- preparation

    def prepare_data(self) -> None:
        """Read, check, sample, split and tokenize every source once; later runs reuse the cache."""
        target = self._cache_path()
        if (target / "report.json").is_file():
            log.info("Prepared data found in cache: %s", target)
            return
        started = time.perf_counter()
        self._build(target)
        log.info("Prepared data in %.1fs: %s", time.perf_counter() - started, target)

    def _build(self, target: Path) -> None:
        import datasets

        reports: list[quality.SourceReport] = []
        train_rows: dict[str, list] = {"messages": [], "source_index": []}
        val_rows: dict[str, list] = {"messages": [], "source_index": []}
        for index, source in enumerate(self.sources):
            report = quality.SourceReport(source.name)
            raw = read_source(source, self.seed)
            check_columns(source, raw)
            kept, dropped = conversations(source, raw, self.system_prompt)
            report.origin = raw.origin
            report.rows_read = len(raw.rows) + len(raw.bad_lines)
            report.dropped = dropped
            report.bad_lines = [number for number, _ in raw.bad_lines][:100]
            report.valid = len(kept)
            # Each source draws with its own stream, so adding a source leaves the others' samples unchanged.
            rng = np.random.default_rng([self.seed, zlib.crc32(source.name.encode())])
            count = round(source.fraction * len(kept))
            chosen = rng.permutation(len(kept))[:count]
            report.kept_after_fraction = int(count)
            n_val = min(self.val_max_rows, round(self.val_fraction * count)) if count > 1 else 0
            for position, row in enumerate(chosen):
                bucket = val_rows if position < n_val else train_rows
                bucket["messages"].append(kept[row])
                bucket["source_index"].append(index)
            reports.append(report)
            if count == 0:
                raise DataSourceError(
                    f"source {source.name!r} ({raw.origin}) has no rows left after its checks: "
                    f"read {report.rows_read}, dropped {dropped or 'none'}"
                )

        encoder = ChatEncoder(self.tokenizer, self.max_length)
        splits = {}
        for split, rows in (("train", train_rows), ("val", val_rows)):
            order = np.random.default_rng(self.seed).permutation(len(rows["messages"]))
            ds = datasets.Dataset.from_dict({k: [v[i] for i in order] for k, v in rows.items()})
            num_proc = self.num_proc if self.num_proc is not None else (
                min(os.cpu_count() or 1, 8) if len(ds) >= 2000 else None)
            ds = ds.map(encoder.encode_batch, batched=True, batch_size=256, num_proc=num_proc,
                        remove_columns=["messages"], desc=f"Tokenizing {split}")
            for index, count in zip(*np.unique(np.asarray(ds["source_index"])[np.asarray(ds["trained"]) == 0],
                                               return_counts=True)):
                dropped = reports[index].dropped
                dropped[quality.NO_TRAINED_TOKENS] = dropped.get(quality.NO_TRAINED_TOKENS, 0) + int(count)
            ds = ds.filter(lambda trained: [t > 0 for t in trained], input_columns="trained", batched=True)
            if split == "val":
                # Sorted by length, validation batches need almost no padding.
                ds = ds.sort("length", reverse=True)
            ds = ds.add_column("sample_id", list(range(len(ds))))
            splits[split] = ds

        for index, report in enumerate(reports):
            for split in ("train", "val"):
                sel = np.asarray(splits[split]["source_index"]) == index
                setattr(report, split, int(sel.sum()))
            lengths = np.concatenate([np.asarray(splits[s]["length"])[np.asarray(splits[s]["source_index"]) == index]
                                      for s in splits])
            trained = np.concatenate([np.asarray(splits[s]["trained"])[np.asarray(splits[s]["source_index"]) == index]
                                      for s in splits])
            report.add_lengths(lengths.tolist(), trained.tolist())

        lengths = splits["train"]["length"]
        if not lengths:
            raise DataSourceError("no training samples are left after the checks; see the data report")
        grouped = list(EpochLengthGroupedSampler(lengths, self.batch_size, self.seed))
        shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(self.seed)).tolist()
        report = quality.DataReport(
            reports,
            batch_size=self.batch_size,
            padding_efficiency_grouped=round(quality.padding_efficiency(lengths, grouped, self.batch_size,
                                                                        self.pad_to_multiple_of), 4),
            padding_efficiency_random=round(quality.padding_efficiency(lengths, shuffled, self.batch_size,
                                                                       self.pad_to_multiple_of), 4),
            fingerprint=target.name,
        )
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        for split, ds in splits.items():
            if len(ds):  # datasets cannot load an empty saved dataset back; no folder means no rows
                ds.save_to_disk(str(tmp / split))
        report.save(tmp / "report.json")  # written last: its presence marks a complete cache
        tmp.replace(target)

    def setup(self, stage: str | None = None) -> None:
        """Load the prepared data from the cache (preparing it first when used outside a Trainer)."""
        import datasets

        if self.train_dataset is not None:
            return
        target = self._cache_path()
        if not (target / "report.json").is_file():
            self.prepare_data()
        self.train_dataset = datasets.load_from_disk(str(target / "train"))
        self.val_dataset = datasets.load_from_disk(str(target / "val")) if (target / "val").is_dir() else None
        self.report = quality.DataReport.load(target / "report.json")
        self._publish_report()

    def _publish_report(self) -> None:
        """Print the report once, and save and log it beside the run's logs when a Trainer is attached."""
        if self._report_logged or self.report is None:
            return
        trainer = self.trainer
        if trainer is not None and not trainer.is_global_zero:
            return
        self.report.print()
        if trainer is not None and trainer.logger is not None and trainer.log_dir:
            self.report.save(Path(trainer.log_dir) / "data_report.json")
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                self.report.log_to_tensorboard(experiment)
        self._report_logged = True

    # ------------------------------------------------------------------------------------- loaders

    def collator(self) -> FinSightCollator:
        """The padding collator used by every loader."""
        return FinSightCollator(self.tokenizer, self.pad_to_multiple_of)

    def train_sampler(self):
        """The training order: length-grouped and seeded per epoch, or plain seeded random."""
        if self.group_by_length:
            return EpochLengthGroupedSampler(self.train_dataset["length"], self.batch_size, self.seed)
        return RandomSampler(self.train_dataset, generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self):
        """A stateful loader: Lightning saves its position in checkpoints, so a resume continues mid-epoch."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(
            self.train_dataset.with_format(columns=["input_ids", "labels", "source_index", "sample_id"]),
            batch_size=self.batch_size,
            sampler=self.train_sampler(),
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation in length order (little padding), with the source of every sample."""
        if self.val_dataset is None:
            return []  # Lightning skips validation without batches
        return DataLoader(
            self.val_dataset.with_format(columns=["input_ids", "labels", "source_index", "sample_id"]),
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self) -> DataLoader:
        """The held-out rows (the validation split) for ``finsight test``."""
        return self.val_dataloader()
