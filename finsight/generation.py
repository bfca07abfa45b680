"""Greedy generation with the fine-tuned model: batched helpers, samples during training, a chat session.

Everything renders prompts with ``ChatEncoder.render(..., add_generation_prompt=True)`` and the training
system prompt, so the model is asked questions exactly the way it was trained to answer them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from transformers import GenerationConfig, TextStreamer

from finsight.data.chat import ChatEncoder
from finsight.data.sources import DEFAULT_SYSTEM_PROMPT
from finsight.evaluation import COUNTS, IDENTITY_PROMPTS, AnswerEvaluator, prompt_examples

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPTS = (
    "What is an expense ratio?",
    "Explain compound interest with an example.",
    "What is the difference between a Roth IRA and a traditional IRA?",
    "What does a company report in its 10-K filing?",
)
"""Finance prompts answered at every validation (identity prompts are separate)."""


@dataclass
class Generation:
    """One generated answer."""

    text: str
    """The answer, special tokens removed, stripped."""
    token_ids: list[int]
    """The new tokens up to and including the first stop token."""
    stopped: bool
    """Ended with an end-of-turn/EOS token rather than by reaching ``max_new_tokens``."""


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The tokens that end an answer: the chat template's end-of-turn token and the EOS tokens.

    The end-of-turn token is read off the template (the first token after an assistant message), so
    templates whose turn end differs from ``eos_token`` (``<|eot_id|>``, ``<|im_end|>``) stop correctly.
    """
    ids: list[int] = []
    encoder = ChatEncoder(tokenizer, max_length=1 << 30)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}]
    tail = encoder.render(messages).rpartition("ANSWER")[2]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    if tail_ids and tail_ids[0] in set(tokenizer.all_special_ids):
        ids.append(tail_ids[0])
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return ids


@contextlib.contextmanager
def generation_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and a private RNG for the duration; the training state comes back after.

    Restored: every submodule's train/eval flag (Lightning keeps them per module), ``config.use_cache``,
    and the CPU and CUDA random number generators, so generating in the middle of training changes
    neither dropout masks nor anything else the run draws afterwards. Gradient checkpointing is left
    enabled: transformers only applies it in training mode with gradients, so it is inactive here.
    """
    modes = {module: module.training for module in model.modules()}
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, training in modes.items():
            module.training = training
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


class StreamWriter(TextStreamer):
    """transformers' ``TextStreamer`` writing the answer (no prompt, no special tokens) to any text stream."""

    def __init__(self, tokenizer: Any, stream: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    stream: TextIO | None = None,
) -> list[Generation]:
    """Greedy answers for tokenized prompts, in batches with left padding, in the prompts' order.

    Prompts are grouped by length so a batch carries little padding. ``stream`` (one prompt only) gets the
    answer's text as it is generated. The model's training state is restored afterwards.
    """
    if stream is not None and len(prompts) != 1:
        raise ValueError(f"streaming needs exactly one prompt, got {len(prompts)}")
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=stop_ids, pad_token_id=pad_id)
    device = _device_of(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    with generation_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = list(prompts[index])
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            streamer = StreamWriter(tokenizer, stream) if stream is not None else None
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config, streamer=streamer)
            for row, index in enumerate(chunk):
                new = output[row, width:].tolist()
                stop_at = next((i for i, token in enumerate(new) if token in stop_ids), None)
                kept = new if stop_at is None else new[: stop_at + 1]
                answer = new if stop_at is None else new[:stop_at]  # the text never includes the stop token
                text = tokenizer.decode(answer, skip_special_tokens=True).strip()
                results[index] = Generation(text, kept, stop_at is not None)
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ callback


def _markdown_cell(text: str) -> str:
    """Text that stays inside one Markdown table cell (TensorBoard renders text summaries as Markdown)."""
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


class GenerationSamples(Callback):
    """Answers a fixed set of prompts at every validation and logs them, so progress can be read, not guessed.

    Greedy and batched, with the model in eval mode and its training state (modes, cache flag, RNG)
    restored afterwards: a run with this callback ends with the same weights as one without. Logged to
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
    ) -> None:
        """
        Args:
            prompts: Finance questions to answer; defaults to four covering concepts, personal finance
                and filings.
            identity_prompts: Questions about the assistant itself; their answers count for
                ``samples/identity`` (names FinSight, no other assistant). Defaults to ``Who are you?``
                and ``What's your name?``.
            max_new_tokens: Longest answer in tokens; bounds the cost of every validation.
            batch_size: Prompts generated together (left-padded).
        """
        super().__init__()
        self.prompts = list(prompts if prompts is not None else DEFAULT_SAMPLE_PROMPTS)
        self.identity_prompts = list(identity_prompts if identity_prompts is not None else IDENTITY_PROMPTS[:2])
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.last_metrics: dict[str, float] = {}
        self.last_answers: list[tuple[str, str]] = []

    def _tokenizer_and_prompt(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Any, str]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "tokenizer"):
            return datamodule.tokenizer, getattr(datamodule, "system_prompt", DEFAULT_SYSTEM_PROMPT)
        from finsight.model import load_tokenizer, resolve_model

        return load_tokenizer(resolve_model(pl_module.hparams.model_name)), DEFAULT_SYSTEM_PROMPT

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or getattr(pl_module, "model", None) is None:
            return
        if not self.prompts and not self.identity_prompts:
            return
        started = time.perf_counter()
        tokenizer, system_prompt = self._tokenizer_and_prompt(trainer, pl_module)
        encoder = ChatEncoder(tokenizer, max_length=1 << 30)
        examples = (prompt_examples(encoder, system_prompt, self.prompts, kind="prompt")
                    + prompt_examples(encoder, system_prompt, self.identity_prompts, kind="identity"))
        # The precision context gives generation the same autocast as the validation steps.
        with trainer.precision_plugin.forward_context():
            outputs = generate(pl_module.model, tokenizer, [e.prompt_ids for e in examples],
                               max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                               stop_ids=stop_token_ids(tokenizer, pl_module.model))
        evaluator = AnswerEvaluator()
        for example, output in zip(examples, outputs):
            evaluator.add(example.question, output.text, stopped=output.stopped, kind=example.kind)
        seconds = time.perf_counter() - started
        metrics = {k: v for k, v in evaluator.compute().items() if k not in COUNTS}
        metrics["seconds"] = seconds
        self.last_metrics = metrics
        self.last_answers = [(r.question, r.answer) for r in evaluator.records]
        step = trainer.global_step
        log.info("Generation samples at step %d: %d answers in %.1fs (distinct-2 %.3f, stopped %.0f%%)", step,
                 len(outputs), seconds, metrics["distinct_2"], 100 * metrics["stopped_by_eos"])
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


# ------------------------------------------------------------------------------------------ chat


class PromptTooLongError(ValueError):
    """A single message that does not fit the context together with the answer budget."""


class ChatSession:
    """A multi-turn conversation with history kept inside ``max_length`` tokens.

    When the next prompt plus ``max_new_tokens`` would exceed ``max_length``, the oldest exchanges are
    dropped (the system prompt always stays), so a long chat keeps going with its recent context.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_length: int = 1024,
        max_new_tokens: int = 256,
    ) -> None:
        if max_new_tokens >= max_length:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be smaller than max_length ({max_length})")
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = ChatEncoder(tokenizer, max_length)
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.history: list[dict[str, str]] = []
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.dropped_exchanges = 0

    def messages(self, question: str) -> list[dict[str, str]]:
        """System prompt, kept history, and the new question."""
        return [{"role": "system", "content": self.system_prompt}, *self.history,
                {"role": "user", "content": question}]

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's tokens, after dropping the oldest exchanges until prompt + answer fit ``max_length``."""
        budget = self.max_length - self.max_new_tokens
        while True:
            text = self.encoder.render(self.messages(question), add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= budget:
                return ids
            if not self.history:
                raise PromptTooLongError(
                    f"the message is {len(ids)} tokens with the system prompt; at most {budget} fit "
                    f"(max_length {self.max_length} - max_new_tokens {self.max_new_tokens})"
                )
            del self.history[:2]  # the oldest user/assistant exchange
            self.dropped_exchanges += 1

    def ask(self, question: str, stream: TextIO | None = None) -> Generation:
        """Answer ``question`` in the context of the conversation so far, optionally streaming the text."""
        ids = self.prompt_ids(question)
        output = generate(self.model, self.tokenizer, [ids], max_new_tokens=self.max_new_tokens,
                          stop_ids=self.stop_ids, batch_size=1, stream=stream)[0]
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": output.text}]
        return output

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()
