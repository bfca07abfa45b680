"""The trained run every export test starts from, and the logits its best checkpoint gives."""

from __future__ import annotations

import pytest
import torch
from helpers import EXPORT_IDS, sampled_fit

from finsight.training.module import FinSightModule


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    module = FinSightModule.from_checkpoint(run["best"], gradient_checkpointing=False)
    with torch.no_grad():
        logits = module(torch.tensor(EXPORT_IDS))
    return run, logits
