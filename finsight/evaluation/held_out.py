"""``finsight test``'s answer evaluation, as a Lightning callback the command line adds to every run.

The LightningModule computes the held-out loss and perplexity (``test/loss``, ``test/ppl``) the way it
validates. :class:`HeldOutEvaluator` adds what is not a forward pass over the loader: the base model's loss
without the adapter (``compare_base``), answers generated to the held-out questions and scored
(:mod:`finsight.evaluation.metrics`), and the results files. Its options are the ``eval:`` section of a config
(``finsight test --eval.compare_base true --eval.file questions.jsonl``): settings of the evaluation, not
hyper-parameters of the model, so a checkpoint's hyper-parameters never override them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from finsight.data.chat import IGNORE_INDEX, ChatEncoder
from finsight.data.sources import SourceFormat, trained_assistant_name
from finsight.evaluation.harness import HarnessError, harness_unavailable_reason, run_harness
from finsight.evaluation.metrics import (
    BASE,
    COUNTS,
    FINE_TUNED,
    AnswerRecord,
    EvalExample,
    check_eval_source,
    file_examples,
    heldout_examples,
    per_source_table,
    results_table,
    share_fairly,
    write_results,
)
from finsight.evaluation.samples import evaluate_answers, run_tokenizer
from finsight.inference.decoding import InferenceChoice, stop_token_ids
from finsight.inference.generation_model import get_generation_model
from finsight.run_dir import publish_file, shared_run_folder
from finsight.training.deepspeed import generation_inference, whole_parameters

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IDENTITY_CHECKS = 3
"""Identity prompts (from the identity source's held-out rows) added to the questions of an eval file or of one
other source, so a narrowed test still says whether the assistant keeps its name."""

PREFIXES = {FINE_TUNED: "test/", BASE: "test_base/"}
"""Logged metric names: the model under test, and the base model without the adapter."""


def identity_name(datamodule: Any) -> str | None:
    """The name the run's identity (``intro``) source gives the assistant, or None for a run that trained none."""
    return trained_assistant_name(list(getattr(datamodule, "sources", [])))


class HeldOutEvaluator(Callback):
    """Answers the held-out questions at the end of ``test``, scores the answers and writes the results.

    The questions are the first assistant turns of every source's validation rows (or of ``eval.source``'s),
    shared fairly between sources up to ``max_samples``, or every turn of ``eval.file``. Logs
    ``test/rouge_l``, ``test/token_f1``, ``test/numeric_agreement``, coherence and (for a run that trained an
    identity source) identity metrics overall and as ``test/<source>/<metric>`` per source (and
    ``test_base/...`` with ``compare_base``), writes ``eval_results.json`` and ``eval_results.md`` into the run
    folder (rank 0) and prints the tables. Runs only in ``test``; ``fit``, ``validate`` and ``predict`` are
    unaffected.
    """

    def __init__(
        self,
        compare_base: bool = False,
        file: str | None = None,
        format: SourceFormat = "qa",
        columns: dict[str, str] | None = None,
        source: str | None = None,
        max_samples: int | None = 100,
        max_new_tokens: int = 128,
        inference: InferenceChoice = "auto",
        harness_tasks: list[str] | None = None,
        harness_include_path: str | None = None,
        harness_limit: int | None = None,
    ) -> None:
        """
        Args:
            compare_base: Also evaluate the base model with the adapter disabled on the same questions (loss,
                perplexity and answers), and report both rows and their difference.
            file: Answer the questions of this file instead of the validation rows: any source format, read
                and checked as training data; every assistant turn of a multi-turn chat is asked, after the
                chat's own earlier turns.
            format: The file's format, as a training source's: qa, messages, sharegpt, alpaca, reddit, intro.
            columns: The file's column names for the format's fields, as a training source's ``columns``.
            source: Ask only this source's validation rows; None asks every source that has validation rows.
                The answers are scored against the references (ROUGE-L, token F1, numbers), per source and
                overall.
            max_samples: At most this many questions are answered in all, shared fairly between the sources
                (generation is the slow part of ``test``); None answers all.
            max_new_tokens: Longest generated answer in tokens.
            inference: Generate with the NF4 weights dequantized and the adapter merged (``merged``; ``auto``
                does so on a CPU, and on a GPU when they fit) or through the 4-bit layers (``4bit``). Both are
                the same weights; greedy answers agree.
            harness_tasks: Also run these EleutherAI lm-evaluation-harness tasks on the same generation model
                (and on the base with ``compare_base``); scores land in the results as
                ``harness/<task>/<metric>``. Needs ``pip install 'finsight[harness]'``.
            harness_include_path: A folder of the user's own harness task YAML files (works offline).
            harness_limit: At most this many documents per harness task (None: all).
        """
        super().__init__()
        self.compare_base = compare_base
        # What is answered, and how.
        self.file, self.format, self.columns = file, format, dict(columns) if columns else None
        self.source, self.max_samples = source, max_samples
        self.max_new_tokens, self.inference = max_new_tokens, inference
        self.harness_tasks, self.harness_include_path = list(harness_tasks or []), harness_include_path
        self.harness_limit = harness_limit
        self.results: dict[str, dict[str, float]] = {}
        self._answers: dict[str, dict[str, float]] = {}
        self._per_source: dict[str, dict[str, dict[str, float]]] = {}
        self._samples: dict[str, list[AnswerRecord]] = {}
        self._settings: dict[str, Any] = {}
        self._base_loss: MeanMetric | None = None
        self._base_ppl: Perplexity | None = None

    # ------------------------------------------------------------------------------------- base model loss

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fresh base-model metrics, and a warning when there is nothing fine-tuned to test."""
        reason = harness_unavailable_reason() if self.harness_tasks else None
        if reason:
            raise HarnessError(reason)  # before any batch is scored
        self._base_loss = MeanMetric().to(pl_module.device)
        self._base_ppl = Perplexity(ignore_index=IGNORE_INDEX).to(pl_module.device)
        if trainer.ckpt_path is None and pl_module.hparams.get("adapter_path") is None and trainer.global_step == 0:
            log.warning("Testing fresh LoRA weights, which leave the base model unchanged: give --ckpt_path "
                        "or --model.adapter_path to test a fine-tuned adapter")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """With ``compare_base``: the same batch's loss with the adapter disabled (the same accounting)."""
        if not self.compare_base:
            return
        with trainer.precision_plugin.forward_context(), pl_module.model.disable_adapter():
            losses = pl_module.sample_losses(batch)
        self._base_loss.update(*losses.means())
        self._base_ppl.update(losses.logits[None], losses.targets[None])

    # ------------------------------------------------------------------------------------- answers

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the base model's loss, then generate answers with each model and log their scores."""
        names = [FINE_TUNED]
        self._answers = {FINE_TUNED: {}}
        if self.compare_base:
            # compute() synchronizes across ranks: every rank makes the call.
            base = {"loss": float(self._base_loss.compute()), "ppl": float(self._base_ppl.compute())}
            pl_module.log("test_base/loss", base["loss"])
            pl_module.log("test_base/ppl", base["ppl"])
            names.append(BASE)
            self._answers[BASE] = base
        tokenizer, system_prompt = run_tokenizer(trainer, pl_module)
        examples, described = self.examples(trainer, tokenizer, system_prompt)
        datamodule = getattr(trainer, "datamodule", None)
        assistant_name = identity_name(datamodule)
        batch_size = max(16, int(getattr(datamodule, "batch_size", 16)))
        stop_ids = stop_token_ids(tokenizer, pl_module.model)
        built: list[str] = []
        started = time.perf_counter()
        inference = generation_inference(trainer.strategy, self.inference)
        # Under ZeRO-3 every rank gathers the whole model to build its generation model from.
        with trainer.precision_plugin.forward_context(), whole_parameters(trainer.strategy, pl_module):
            for name in names:
                # The same weights as the loss: the trained model, or its base without the LoRA update.
                generator = get_generation_model(pl_module.model, inference=inference, merge_adapter=name != BASE)
                built.append(generator.described)
                context = (pl_module.model.disable_adapter() if name == BASE and generator.kind == "4bit"
                           else contextlib.nullcontext())
                with context:
                    evaluator = evaluate_answers(generator.model, tokenizer, examples,
                                                 max_new_tokens=self.max_new_tokens, stop_ids=stop_ids,
                                                 batch_size=batch_size, assistant_name=assistant_name)
                    if self.harness_tasks:
                        self._answers[name].update(run_harness(
                            generator.model, tokenizer, self.harness_tasks, include_path=self.harness_include_path,
                            limit=self.harness_limit))
                del generator
                self._answers[name].update(evaluator.compute())
                for source in evaluator.sources():
                    self._per_source.setdefault(source, {})[name] = evaluator.compute(source)
                self._samples[name] = evaluator.records
        seconds = time.perf_counter() - started
        log.info("Answered %d questions × %d model(s) in %.1fs (%s)", len(examples), len(names), seconds, described)
        for name in names:
            pl_module.log_dict({PREFIXES[name] + k: float(v) for k, v in self._answers[name].items()
                                if k not in ("loss", "ppl", *COUNTS)})
            for source, rows in self._per_source.items():
                pl_module.log_dict({f"{PREFIXES[name]}{source}/{k}": float(v) for k, v in rows.get(name, {}).items()
                                    if k not in COUNTS})
        self._settings = {
            "eval_set": described,
            "questions": sum(e.kind == "qa" for e in examples),
            "identity_prompts": sum(e.kind == "identity" for e in examples),
            "assistant_name": assistant_name,
            "questions_per_source": {s: sum(e.source == s for e in examples) for s in dict.fromkeys(
                e.source for e in examples)},
            "max_new_tokens": self.max_new_tokens,
            "decoding": "greedy",
            "generation_model": built[0] if built else None,
            "model_name": pl_module.hparams.get("model_name"),
            "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "adapter_path": pl_module.hparams.get("adapter_path"),
            "generation_seconds": round(seconds, 1),
            "harness_tasks": self.harness_tasks or None,
        }

    def examples(self, trainer: L.Trainer, tokenizer: PreTrainedTokenizerBase, system_prompt: str) -> tuple[list[EvalExample], str]:
        """The questions to answer, and a description of where they come from.

        ``file`` when set, else the validation rows of every source (or of ``source``) from the data module, up
        to ``max_samples`` shared fairly between them. An identity source's rows are asked as identity prompts
        (also scored for the assistant's name); with ``file`` or ``source``, its rows are added to them.
        """
        encoder = ChatEncoder.untruncated(tokenizer)
        datamodule = getattr(trainer, "datamodule", None)
        val = getattr(datamodule, "val_dataset", None)
        names = list(getattr(datamodule, "source_names", []))
        formats = {s.name: s.format for s in getattr(datamodule, "sources", [])}
        available = dict(Counter(names[i] for i in val["source_index"])) if val is not None else {}
        identity = [n for n in names if formats.get(n) == "intro" and available.get(n)]
        if self.file:
            asked = file_examples(self.file, encoder, system_prompt, self.max_samples, self.format, self.columns)
            described = f"file {self.file} ({self.format})"
            chosen = dict.fromkeys(identity, IDENTITY_CHECKS)
        else:
            check_eval_source(self.source, names)
            wanted = [self.source] if self.source else [n for n in names if available.get(n)]
            asked, chosen = [], share_fairly({n: available.get(n, 0) for n in wanted}, self.max_samples)
            described = ("validation rows of " + ", ".join(f"{n} ({k})" for n, k in chosen.items() if k)
                         if any(chosen.values()) else "no held-out questions (no validation rows)")
            if self.source:
                chosen.update({n: IDENTITY_CHECKS for n in identity if n != self.source})
        for name, count in chosen.items():
            if count:
                asked += heldout_examples(val, names.index(name), tokenizer, encoder, system_prompt, count,
                                          source=name, kind="identity" if name in identity else "qa")
        return asked, described

    # ------------------------------------------------------------------------------------- results

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``eval_results.json`` and ``.md`` into the run folder and print the table (rank 0)."""
        # A collective call that every rank must make (it broadcasts rank 0's folder).
        folder = Path(shared_run_folder(trainer))
        metrics = trainer.callback_metrics
        rows = {FINE_TUNED: {"loss": float(metrics["test/loss"]), "ppl": float(metrics["test/ppl"]),
                             **self._answers.get(FINE_TUNED, {})}}
        if BASE in self._answers:
            rows[BASE] = self._answers[BASE]
        self.results = rows
        if not trainer.is_global_zero:
            return
        json_path, md_path = write_results(folder, rows, self._samples, self._settings, self._per_source)
        for path in (json_path, md_path):
            publish_file(trainer, path)
        console = Console()
        console.print(results_table(rows, title=f"finsight test: {self._settings.get('eval_set', '')}").rich())
        if self._per_source:
            console.print(per_source_table(self._per_source).rich())
        console.print(f"[bold green]Results:[/] {json_path.resolve()} and {md_path.name}")
