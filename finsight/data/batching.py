"""Length-grouped sampling and padding: each batch is padded only to its own longest sample.

Both training samplers draw an order that is a pure function of ``(seed, epoch)`` and are resumable:
``StatefulDataLoader`` saves their ``state_dict`` (the epoch and how many indices were drawn) in its own
state, which Lightning puts in checkpoints, and a fresh sampler that loads it continues the same epoch's
order exactly where it stopped, whatever epoch the fresh sampler was at.

With a token budget (:class:`TokenBudgetBatchSampler`) the sampler yields whole micro-batches instead of
indices, each filled to the budget, and the same holds per micro-batch.

Since the order is known in advance, so is every optimizer step's content: with :class:`StepTokens` set, a
sampler yields ``(index, trained tokens of the optimizer step this sample belongs to)``, counted over all
micro-batches of the accumulation window on all ranks, and :class:`WithStepTokens` puts that total in each
row. The training loss divides by it, so a step's gradient is the mean over all of its trained tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from finsight import compat
from finsight.data.chat import IGNORE_INDEX
from finsight.errors import FinSightError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STEP_TOKENS = "step_trained_tokens"
CONVERSATION_LENGTHS = "conversation_lengths"
"""In a packed batch, which has no attention mask: the tokens of each conversation (the rest is padding)."""


class DataOrderChangedError(FinSightError, ValueError):
    """A resumed run whose data order cannot continue the checkpoint's (another seed draws another order).

    Fix: resume with the seed and sources the run started with, or start a new run (no `--ckpt_path`).
    """


@dataclass(frozen=True)
class StepTokens:
    """How an epoch's order is cut into optimizer steps, to count each step's trained tokens in advance.

    Rank ``r`` of ``world_size`` trains on every ``world_size``-th sample of the order from ``r`` on
    (``DistributedSampler(shuffle=False)``), in micro-batches of ``batch_size``, and Lightning steps the
    optimizer after every ``accumulation`` micro-batches and at the end of the epoch. So optimizer step ``k``
    holds exactly positions ``[k * S, (k + 1) * S)`` of the order, ``S = batch_size * accumulation *
    world_size``, all ranks included.
    """

    trained: Sequence[int]
    """Per sample: the positions whose next token is trained (the terms of its loss)."""
    batch_size: int
    """Order entries per micro-batch: samples, or 1 when each entry is a whole micro-batch (a token budget)."""
    accumulation: int = 1
    world_size: int = 1

    def pad(self, order: list[int]) -> list[int]:
        """Repeat the order's first samples up to a multiple of the world size, as ``DistributedSampler`` would
        (which then has nothing left to pad), so the padded samples' totals are those of their own step."""
        if self.world_size == 1 or len(order) % self.world_size == 0:
            return order
        total = math.ceil(len(order) / self.world_size) * self.world_size
        return (order * math.ceil(total / len(order)))[:total]

    def totals(self, order: list[int]) -> list[int]:
        """The trained-token total of the optimizer step each position of ``order`` falls in."""
        size = self.batch_size * self.accumulation * self.world_size
        totals: list[int] = []
        for begin in range(0, len(order), size):
            chunk = order[begin:begin + size]
            totals += [sum(self._trained(entry) for entry in chunk)] * len(chunk)
        return totals

    def _trained(self, entry: int | list[int]) -> int:
        """The trained tokens of an order entry: one sample, or a whole micro-batch of them."""
        if isinstance(entry, list):
            return sum(self.trained[index] for index in entry)
        return self.trained[entry]


class _ResumableEpochOrder:
    """``set_epoch`` plus a ``state_dict`` that lets a fresh sampler continue a half-consumed epoch.

    The count is kept by the sampler's own iterator, in the process that draws the indices (the main
    process, also with DataLoader workers), so it matches the batches the loader's state says were drawn.
    """

    seed: int
    epoch: int = 0
    _drawn: int = 0
    _resume_at: int = 0
    step_tokens: StepTokens | None = None
    """When set, yield ``(index, step total)`` pairs for :class:`WithStepTokens` instead of bare indices."""

    def _size(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        if self.step_tokens is None:
            return self._size()
        return math.ceil(self._size() / self.step_tokens.world_size) * self.step_tokens.world_size

    def _order(self, generator: torch.Generator) -> list[Any]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration draw the order of ``epoch`` (Lightning calls this before every epoch)."""
        if epoch != self.epoch:
            self._resume_at = 0  # a saved position belongs to the epoch it was saved in
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        order = self._order(torch.Generator().manual_seed(self.seed + self.epoch))
        totals = None
        if self.step_tokens is not None:
            # Totals come from the whole epoch's order, also when a resumed run starts halfway through it.
            order = self.step_tokens.pad(order)
            totals = self.step_tokens.totals(order)
        start, self._resume_at = self._resume_at, 0
        self._drawn = start
        for position in range(start, len(order)):
            self._drawn += 1
            entry = order[position]
            if totals is None:
                yield entry
            elif isinstance(entry, list):  # a whole micro-batch: every sample carries the step's total
                yield [(index, totals[position]) for index in entry]
            else:
                yield entry, totals[position]

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many indices of its order were drawn."""
        return {"epoch": self.epoch, "drawn": self._drawn, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch's order after the indices already drawn."""
        if state.get("seed", self.seed) != self.seed:
            raise DataOrderChangedError(f"the checkpoint's data order was drawn with seed {state['seed']}, this run "
                                        f"uses {self.seed}: resume with the seed it was trained with, or start a "
                                        "new run without --ckpt_path")
        self.epoch = int(state["epoch"])
        self._resume_at = int(state["drawn"])


class EpochLengthGroupedSampler(_ResumableEpochOrder, Sampler[int]):
    """``transformers``' length-grouped order (shuffled mega-batches sorted by length), seeded per epoch.

    The order is the one ``transformers``' ``LengthGroupedSampler`` draws (its ``get_length_grouped_indices``).
    The longest sample is moved into the first batch, so a run that would run out of memory does so at
    its first step.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def _size(self) -> int:
        return len(self.lengths)

    def _order(self, generator: torch.Generator) -> list[int]:
        return compat.transformers.length_grouped_indices(self.lengths, self.batch_size, generator)


class EpochRandomSampler(_ResumableEpochOrder, Sampler[int]):
    """Plain random order (``group_by_length=False``), seeded per epoch and resumable like the grouped one."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def _size(self) -> int:
        return self.size

    def _order(self, generator: torch.Generator) -> list[int]:
        return torch.randperm(self.size, generator=generator).tolist()


def rounded_up(length: int, multiple: int | None) -> int:
    """``length`` padded up to a multiple of ``multiple`` (unchanged for None), as the collators pad rows."""
    return math.ceil(length / multiple) * multiple if multiple else length


def padded_tokens(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    """Tokens a micro-batch of one conversation per row computes: rows × the longest, padded as the collator pads."""
    return len(lengths) * rounded_up(max(lengths), pad_to_multiple_of)


def packed_tokens(lengths: Sequence[int], row_length: int, pad_to_multiple_of: int | None) -> int:
    """Tokens a packed micro-batch computes: :class:`PackingCollator`'s rows × its row width."""
    rows = pack_into_rows(lengths, row_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    return len(rows) * max(width, min(rounded_up(width, pad_to_multiple_of), row_length))


def cut_to_budget(ascending: Sequence[int], budget: int, cost: Callable[[Sequence[int]], int]) -> list[int]:
    """The sizes of the micro-batches that a run of sample lengths sorted in ascending order is cut into: each
    the longest prefix of what is left whose ``cost`` fits ``budget`` (found by doubling, then bisection; the
    cost grows with the prefix), and at least one sample, so a sample over the budget is a micro-batch alone."""
    sizes: list[int] = []
    begin, total = 0, len(ascending)
    while begin < total:
        def fits(size: int, begin: int = begin) -> bool:
            return cost(ascending[begin:begin + size]) <= budget

        fitting, too_many = 1, 2
        while begin + too_many <= total and fits(too_many):
            fitting, too_many = too_many, too_many * 2
        too_many = min(too_many, total - begin + 1)
        while too_many - fitting > 1:
            middle = (fitting + too_many) // 2
            fitting, too_many = (middle, too_many) if fits(middle) else (fitting, middle)
        sizes.append(fitting)
        begin += fitting
    return sizes


@functools.lru_cache(maxsize=4)
def _budget_cut(ascending: tuple[int, ...], budget: int, packed_row_length: int | None,
                pad_to_multiple_of: int | None) -> list[int]:
    """:func:`cut_to_budget` of a data module's sorted lengths, computed once: a run builds its training loader
    several times (the step count, the trainer's own, the batch size finder), and a packed cut of 250,000
    samples takes seconds."""
    if packed_row_length is None:
        cost = partial(padded_tokens, pad_to_multiple_of=None)  # the lengths are rounded already
    else:
        cost = partial(packed_tokens, row_length=packed_row_length, pad_to_multiple_of=pad_to_multiple_of)
    return cut_to_budget(ascending, budget, cost)


class TokenBudgetBatchSampler(_ResumableEpochOrder, Sampler[list[int]]):
    """Micro-batches filled to a budget of tokens: many short conversations or a few long ones, never more
    than ``budget`` tokens of compute (the tensor the collator builds: rows × row width, padding included;
    ``packed_row_length`` set: packed rows of that length) unless one sample alone is longer.

    Every epoch sorts the samples by length, breaking ties in a seeded random order, and cuts the sorted run
    (:func:`cut_to_budget`). The cut depends only on the sorted lengths, so every epoch has the same number of
    micro-batches, which Lightning reads once (progress bar, schedule, the epoch's end), while which samples of
    equal length share a micro-batch changes from epoch to epoch; unpacked, lengths are rounded up to
    ``pad_to_multiple_of`` first, as the collator pads, so more samples tie. The micro-batches then go in a
    seeded random order, the one holding the longest sample first, so a run that would run out of memory does
    so at its first step. Yields lists of indices (or of ``(index, step total)`` with :class:`StepTokens`).
    """

    def __init__(self, lengths: Sequence[int], budget: int, seed: int, packed_row_length: int | None = None,
                 pad_to_multiple_of: int | None = 8):
        self.budget = budget
        self.seed = seed
        self.epoch = 0
        if packed_row_length is None:
            self.lengths = [rounded_up(length, pad_to_multiple_of) for length in lengths]
        else:
            self.lengths = list(lengths)
        self.sizes = _budget_cut(tuple(sorted(self.lengths)), budget, packed_row_length, pad_to_multiple_of)

    def _size(self) -> int:
        return len(self.sizes)

    def _order(self, generator: torch.Generator) -> list[list[int]]:
        tie_break = torch.rand(len(self.lengths), generator=generator).numpy()
        ascending = np.lexsort((tie_break, self.lengths)).tolist()
        batches, begin = [], 0
        for size in self.sizes:
            batches.append(ascending[begin:begin + size])
            begin += size
        order = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
        longest = next(k for k, batch in enumerate(order) if ascending[-1] in batch)
        order.insert(0, order.pop(longest))
        return order


def largest_micro_batch(batch_size: int, max_length: int, batch_tokens: int | None = None) -> tuple[int, int]:
    """(rows, length) of the largest training micro-batch the settings allow, for memory estimates: under a
    token budget, as many rows of ``max_length`` as the budget holds (the most attention per token)."""
    if batch_tokens is not None:
        return max(1, batch_tokens // max_length), max_length
    return batch_size, max_length


class WithStepTokens(TorchDataset):
    """A dataset read with ``(index, step total)`` keys: each row gets the total as ``step_trained_tokens``."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        rows = self.rows.__getitems__([index for index, _ in keys])  # one Arrow read per batch
        for row, (_, total) in zip(rows, keys):
            row[STEP_TOKENS] = total
        return rows

    def __getitem__(self, key: tuple[int, int] | list[tuple[int, int]]) -> dict[str, Any] | list[dict[str, Any]]:
        # A list is a whole micro-batch from a token budget (a loader without batch_size hands it over as is).
        return self.__getitems__(key) if isinstance(key, list) else self.__getitems__([key])[0]


def stratified_validation_order(source_index: list[int], lengths: list[int], batch_size: int,
                                seed: int) -> list[int]:
    """Validation order in which the first batches cover every source, with little padding.

    Each source's samples are sorted by length and cut into batches (similar lengths: little padding);
    each source's full batches are put in a seeded random order, so a slice of them spans its lengths,
    its one smaller batch last; then the sources take turns, one batch each. Source ``k`` (counting those
    with validation samples) starts within the first ``k + 1`` loader batches, so ``limit_val_batches`` of
    at least the number of sources keeps every source in the validation loss. Once a source's smaller
    batch has been placed, later loader batches may hold two sources.
    """
    generator = torch.Generator().manual_seed(seed)
    per_source: dict[int, list[list[int]]] = {}
    for source in sorted(set(source_index)):
        members = sorted((i for i, s in enumerate(source_index) if s == source), key=lambda i: -lengths[i])
        batches = [members[start : start + batch_size] for start in range(0, len(members), batch_size)]
        full = [batch for batch in batches if len(batch) == batch_size]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=generator).tolist()]
        per_source[source] = shuffled + [batch for batch in batches if len(batch) < batch_size]
    order: list[int] = []
    for turn in range(max((len(b) for b in per_source.values()), default=0)):
        for batches in per_source.values():
            if turn < len(batches):
                order.extend(batches[turn])
    return order


class FinSightCollator(DataCollatorForSeq2Seq):
    """Pads ``input_ids`` with the pad token and ``labels`` with -100 to the batch's longest sample.

    Extra integer columns (``source_index``, ``sample_id``) pass through as tensors, so validation can
    report the loss per source and tests can check which samples were consumed.
    """

    passthrough = ("source_index", "sample_id", STEP_TOKENS)

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = 8):
        super().__init__(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                         label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict:
        features = [dict(f) for f in features]  # the dataset's rows are not ours to change
        extra = {key: torch.tensor([f.pop(key) for f in features]) for key in self.passthrough
                 if key in features[0]}
        for f in features:
            f.pop("length", None)
            f.pop("trained", None)
        batch = super().__call__(features, return_tensors)
        batch.update(extra)
        return dict(batch)


def pack_into_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``row_length`` tokens: first-fit decreasing (the
    longest conversation opens the first row; each next one goes into the first row with room), so few rows
    hold the micro-batch. Deterministic: equal lengths keep their order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([index])
            room.append(row_length - lengths[index])
        else:
            rows[row].append(index)
            room[row] -= lengths[index]
    return rows


class PackingCollator:
    """Several conversations in one row of at most ``max_length`` tokens, with no padding between them.

    Each row is ``transformers``' ``DataCollatorWithFlattening`` of its conversations: their tokens one after
    the other, ``position_ids`` that restart at 0 for every conversation, and the first label of each one set
    to -100, so no position is trained to predict the next conversation's first token. Without an attention
    mask, ``transformers`` builds attention from the ``position_ids`` that stays inside each conversation
    (block-diagonal causal masks for sdpa and eager, variable-length kernels for flash-attention). Rows are
    padded to the longest one; the padding restarts its positions too, so it is a segment of its own that no
    conversation attends to, and its labels are -100. Every label keeps its meaning, so the trained tokens and
    their weights in the loss are those of the same conversations unpacked.
    """

    passthrough = FinSightCollator.passthrough

    def __init__(self, pad_token_id: int, max_length: int, pad_to_multiple_of: int | None = 8):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra = {key: torch.tensor([f[key] for f in features]) for key in self.passthrough if key in features[0]}
        conversations = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features]
        rows = [self.flatten([conversations[i] for i in members], return_tensors="pt")
                for members in pack_into_rows([len(c["input_ids"]) for c in conversations], self.max_length)]
        width = max(row["input_ids"].shape[1] for row in rows)
        if self.pad_to_multiple_of:  # rounded up, but never past max_length for rounding's sake
            width = max(width, min(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of,
                                   self.max_length))
        batch = {"input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
                 "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
                 "position_ids": torch.zeros((len(rows), width), dtype=torch.long)}
        for number, row in enumerate(rows):
            used = row["input_ids"].shape[1]
            for key in ("input_ids", "labels", "position_ids"):
                batch[key][number, :used] = row[key][0]
            batch["position_ids"][number, used:] = torch.arange(width - used)
        batch[CONVERSATION_LENGTHS] = torch.tensor([len(c["input_ids"]) for c in conversations])
        batch.update(extra)
        return batch
