"""Length-grouped sampling and padding: each batch is padded only to its own longest sample."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq
from transformers.trainer_pt_utils import LengthGroupedSampler

from finsight.data.chat import IGNORE_INDEX


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """``transformers``' length-grouped sampler (shuffled mega-batches sorted by length), seeded per epoch.

    The order is a pure function of ``(seed, epoch)``, so a resumed run can replay it and skip what was
    already consumed: ``StatefulDataLoader`` fast-forwards it by the number of batches it had yielded.
    Lightning calls ``set_epoch`` before every epoch (also through its distributed wrapper).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(batch_size=batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration draw the order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def order_of(sampler: Any) -> list[int]:
    """The sample order a sampler yields (for reports and tests)."""
    return list(iter(sampler))


class FinSightCollator(DataCollatorForSeq2Seq):
    """Pads ``input_ids`` with the pad token and ``labels`` with -100 to the batch's longest sample.

    Extra integer columns (``source_index``, ``sample_id``) pass through as tensors, so validation can
    report the loss per source and tests can check which samples were consumed.
    """

    passthrough = ("source_index", "sample_id")

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = 8):
        super().__init__(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                         label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict:
        extra = {key: torch.tensor([f.pop(key) for f in features]) for key in self.passthrough
                 if key in features[0]}
        for f in features:
            f.pop("length", None)
            f.pop("trained", None)
        batch = super().__call__(features, return_tensors)
        batch.update(extra)
        return dict(batch)
