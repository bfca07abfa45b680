"""EleutherAI's lm-evaluation-harness on the model ``finsight test`` generates with.

The harness is how fine-tunes are compared across tools (Axolotl's ``lm_eval`` plugin, torchtune's
``eleuther_eval``, ``litgpt evaluate``). ``finsight test --eval.harness_tasks [...]`` hands it the generation
model finsight already builds (the NF4 weights dequantized with the adapter merged, or the base alone with
``compare_base``) through the harness's own Hugging Face model class (``HFLM`` given the model object), so the
scores are of exactly the weights that were trained and tested. Task folders of the user's own
(``harness_include_path``) load offline; the harness's built-in tasks download their datasets from the Hub.
Needs the ``harness`` extra: ``pip install 'finsight[harness]'``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from finsight.errors import FinSightError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

HARNESS_INSTALL = "pip install 'finsight[harness]'"


class HarnessError(FinSightError, RuntimeError):
    """The harness is not installed, or a task it was asked for does not exist.

    Fix: install the harness (`pip install 'finsight[harness]'`) and name tasks it lists (`lm_eval --tasks
    list`), or add your own with `--eval.harness_include_path`.
    """


def harness_unavailable_reason() -> str | None:
    """Why the harness cannot run here, or None."""
    if importlib.util.find_spec("lm_eval") is None:
        return f"--eval.harness_tasks needs EleutherAI's lm-evaluation-harness: {HARNESS_INSTALL}"
    return None


def run_harness(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], *,
                include_path: str | None = None, limit: int | None = None, batch_size: int = 8,
                ) -> dict[str, float]:
    """The harness's scores of ``model`` on ``tasks``, as ``harness/<task>/<metric>`` → value.

    ``limit`` caps the documents per task (None: all). Bootstrapped standard errors are not computed (they
    cost more than the scores on a CPU).
    """
    reason = harness_unavailable_reason()
    if reason:
        raise HarnessError(reason)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include_path})" if include_path else ""
        raise HarnessError(f"--eval.harness_tasks: no harness task named {', '.join(unknown)}{where}; "
                           "see `lm_eval ls tasks`, or give --eval.harness_include_path with your task folder")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                              bootstrap_iters=0)
    scores: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            # The harness names metrics "<metric>,<filter>" ("acc,none"); the filter is kept when it is not none.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metric, _, applied = key.partition(",")
                name = metric if applied in ("", "none") else f"{metric}.{applied}"
                scores[f"harness/{task}/{name}"] = float(value)
    return scores
