"""Generation during training and testing: samples logged at every validation, scored answers.

Answers are generated greedily (reproducible) by :mod:`finsight.inference.decoding` with the model that
``finsight.inference.generation_model`` builds, and scored by :mod:`finsight.evaluation.metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from finsight.data.chat import ChatEncoder
from finsight.data.sources import DEFAULT_SYSTEM_PROMPT, trained_assistant_name
from finsight.data.tokenizer import load_chat_tokenizer
from finsight.evaluation.metrics import (
    COUNTS,
    IDENTITY_PROMPTS,
    AnswerEvaluator,
    EvalExample,
    prompt_examples,
)
from finsight.inference.decoding import InferenceChoice, generate, stop_token_ids
from finsight.inference.generation_model import get_generation_model
from finsight.training.deepspeed import generation_inference, whole_parameters

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPTS = (
    "What is an expense ratio?",
    "Explain compound interest with an example.",
    "What is the difference between a Roth IRA and a traditional IRA?",
    "What does a company report in its 10-K filing?",
)
"""Finance prompts answered at every validation (identity prompts are separate)."""


def evaluate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[EvalExample], *,
                     max_new_tokens: int, stop_ids: Sequence[int], batch_size: int = 8,
                     assistant_name: str | None = None) -> AnswerEvaluator:
    """Greedy answers to the examples, scored against their references (``finsight test``, samples)."""
    outputs = generate(model, tokenizer, [e.prompt_ids for e in examples], max_new_tokens=max_new_tokens,
                       stop_ids=stop_ids, batch_size=batch_size)
    evaluator = AnswerEvaluator()
    for example, output in zip(examples, outputs):
        evaluator.add(example.question, output.text, stopped=output.stopped, kind=example.kind,
                      reference=example.reference, source=example.source, assistant_name=assistant_name)
    return evaluator


def run_tokenizer(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Any, str]:
    """The tokenizer and system prompt the run trained with: the data module's, else the model reference's."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "tokenizer"):
        return datamodule.tokenizer, getattr(datamodule, "system_prompt", DEFAULT_SYSTEM_PROMPT)
    return load_chat_tokenizer(pl_module.hparams.model_name), DEFAULT_SYSTEM_PROMPT


# ------------------------------------------------------------------------------------------ callback


def _markdown_cell(text: str) -> str:
    """Text that stays inside one Markdown table cell (TensorBoard renders text summaries as Markdown)."""
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


class GenerationSamples(Callback):
    """Answers a fixed set of prompts at every validation and logs them, so progress can be read, not guessed.

    Greedy and batched, with the trained weights as ``finsight.inference.generation_model.get_generation_model`` builds them
    (on a CPU: NF4 dequantized, adapter merged, several times faster than the 4-bit layers, same greedy
    tokens); the training model's state (modes, cache flag, RNG) is left as it was: a run with this
    callback ends with the same weights as one without. Logged to
    TensorBoard as a text table (prompt, answer, stopped, step) under ``samples/generations`` and as
    scalars ``samples/distinct_2``, ``samples/repetition_3``, ``samples/mean_answer_words``,
    ``samples/stopped_by_eos``, ``samples/identity`` and ``samples/seconds`` (its cost).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        identity_prompts: list[str] | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        inference: InferenceChoice = "auto",
    ) -> None:
        """
        Args:
            prompts: Finance questions to answer; defaults to four covering concepts, personal finance
                and filings.
            identity_prompts: Questions about the assistant itself, asked when the run trains an identity
                (an ``intro`` source); their answers count for ``samples/identity`` (names that source's
                ``assistant_name``, no other assistant). Defaults to ``Who are you?`` and ``What's your name?``.
            max_new_tokens: Longest answer in tokens; bounds the cost of every validation.
            batch_size: Prompts generated together (left-padded).
            inference: ``auto`` generates with the dequantized, merged weights on a CPU (and on a GPU when
                they fit), ``merged`` always, ``4bit`` through the training model's own layers.
        """
        super().__init__()
        self.prompts = list(prompts if prompts is not None else DEFAULT_SAMPLE_PROMPTS)
        self.identity_prompts = list(identity_prompts if identity_prompts is not None else IDENTITY_PROMPTS[:2])
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.inference = inference
        self.last_metrics: dict[str, float] = {}
        self.last_answers: list[tuple[str, str]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or getattr(pl_module, "model", None) is None:
            return
        if not self.prompts and not self.identity_prompts:
            return
        started = time.perf_counter()
        tokenizer, system_prompt = run_tokenizer(trainer, pl_module)
        encoder = ChatEncoder.untruncated(tokenizer)
        name = trained_assistant_name(list(getattr(getattr(trainer, "datamodule", None), "sources", [])))
        examples = prompt_examples(encoder, system_prompt, self.prompts, kind="prompt")
        if name is not None:  # a run that trains no identity is not asked who it is
            examples += prompt_examples(encoder, system_prompt, self.identity_prompts, kind="identity")
        # Under ZeRO-3 every rank gathers the whole model to build its generation model from.
        with whole_parameters(trainer.strategy, pl_module):
            model = get_generation_model(pl_module.model,
                                         inference=generation_inference(trainer.strategy, self.inference)).model
        # The precision context gives generation the same autocast as the validation steps.
        with trainer.precision_plugin.forward_context():
            evaluator = evaluate_answers(model, tokenizer, examples, max_new_tokens=self.max_new_tokens,
                                         batch_size=self.batch_size, stop_ids=stop_token_ids(tokenizer, pl_module.model),
                                         assistant_name=name)
        del model
        seconds = time.perf_counter() - started
        metrics = {k: v for k, v in evaluator.compute().items() if k not in COUNTS}
        metrics["seconds"] = seconds
        self.last_metrics = metrics
        self.last_answers = [(r.question, r.answer) for r in evaluator.records]
        step = trainer.global_step
        log.info("Generation samples at step %d: %d answers in %.1fs (distinct-2 %.3f, stopped %.0f%%)", step,
                 len(evaluator.records), seconds, metrics["distinct_2"], 100 * metrics["stopped_by_eos"])
        if not trainer.is_global_zero:
            return
        table = ["| prompt | answer | stopped |", "|---|---|---|"]
        table += [f"| {_markdown_cell(r.question)} | {_markdown_cell(r.answer)} | {'yes' if r.stopped else 'no'} |"
                  for r in evaluator.records]
        text = f"**step {step}**\n\n" + "\n".join(table)
        for logger in trainer.loggers:
            logger.log_metrics({f"samples/{k}": v for k, v in metrics.items()}, step=step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("samples/generations", text, global_step=step)
