"""Generating answers with a model: batched generation, stop tokens, decoding options, a chat session.

Prompts are token ids rendered by ``ChatEncoder.render(..., add_generation_prompt=True)`` with the training
system prompt, so the model is asked questions exactly the way it was trained to answer them. ``finsight
test`` and the training samples decode greedily (reproducible); the chat samples with the settings of
:func:`chat_generation_config`. This module needs only torch and transformers (no Lightning, no metrics),
so ``finsight chat`` starts without the training stack; :mod:`finsight.evaluation.samples` builds the samples and
the scored answers of ``finsight test`` on it. The record of a generation model (:class:`GenerationModel`)
and the options that choose it live here too, so the chat can name them without importing how they are built
(:mod:`finsight.inference.generation_model`, which needs PEFT and bitsandbytes).
"""

from __future__ import annotations

import contextlib
import copy
import random
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from finsight.data.chat import ChatEncoder
from finsight.data.sources import DEFAULT_SYSTEM_PROMPT
from finsight.errors import FinSightError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

InferenceChoice = Literal["auto", "merged", "4bit"]
"""``merged``: dequantized base with the adapter merged (fast); ``4bit``: the training model as it is;
``auto``: ``merged`` on a CPU, and on a GPU when the dense model fits in free memory."""

InferenceDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""dtype of the merged model; ``auto`` is the training compute dtype."""


class GenerationSettingsError(FinSightError, ValueError):
    """Generation options that cannot work together (an answer longer than the whole context).

    Fix: lower `--max_new_tokens` below the context length, or raise `--max_length`.
    """


@dataclass
class GenerationModel:
    """The model to call ``generate`` on, and how it was built (for the log and the results)."""

    model: torch.nn.Module
    kind: str
    """``merged`` or ``4bit``."""
    described: str
    """One line: what the weights are, their dtype and device, and the build time."""
    weights: str = ""
    """What the weights are, without how they were obtained (kept with a cached copy of the model)."""


def merged_weights(quantization: str | None, dtype: torch.dtype, adapter: bool,
                   device: torch.device | str = "cpu") -> str:
    """What a merged generation model holds, in the words of its log line and of a cached copy's record.

    ``quantization`` is the 4-bit type whose values the weights are (``nf4``, ``fp4``), or None.
    """
    weights = f"{quantization.upper()} weights dequantized" if quantization else "weights"
    with_adapter = "with the adapter merged" if adapter else "without adapter"
    return f"{weights} to {str(dtype).removeprefix('torch.')} {with_adapter}, on {device}"


@dataclass
class Generation:
    """One generated answer."""

    text: str
    """The answer, special tokens removed, stripped."""
    token_ids: list[int]
    """The new tokens up to and including the first stop token."""
    stopped: bool
    """Ended with an end-of-turn/EOS token rather than by reaching ``max_new_tokens``."""
    interrupted: bool = False
    """Stopped early on request (Ctrl-C in the chat); the answer is what was generated until then."""


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> list[int]:
    """The tokens that end an answer: the chat template's end-of-turn token and the EOS tokens.

    The end-of-turn token is read off the template (the first token after an assistant message), so
    templates whose turn end differs from ``eos_token`` (``<|eot_id|>``, ``<|im_end|>``) stop correctly.
    """
    ids: list[int] = []
    encoder = ChatEncoder.untruncated(tokenizer)
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


class StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once ``event`` is set (from another thread: Ctrl-C in the chat)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def chat_generation_config(temperature: float = 0.7, top_p: float = 0.9, repetition_penalty: float = 1.1,
                           no_repeat_ngram_size: int = 0, prompt_lookup_tokens: int = 0) -> GenerationConfig:
    """Decoding for conversation: sampling at ``temperature`` from the ``top_p`` nucleus, repeats penalised.

    ``temperature`` 0 decodes greedily (the other options still apply). The defaults are the common
    settings for chat models of this size: greedy answers of small models tend to loop on one sentence.
    ``prompt_lookup_tokens`` > 0 turns on transformers' prompt-lookup decoding: up to that many tokens that
    followed the last n-gram earlier in the conversation are proposed and checked in one forward pass, so
    several tokens can cost one read of the weights (what limits decoding on a CPU). Every kept token is
    the one the model itself picks (greedy) or samples, so answers are distributed as without it; greedy
    answers are the same tokens. Generation with it runs one conversation at a time.
    """
    sampling = temperature > 0
    return GenerationConfig(do_sample=sampling, temperature=temperature if sampling else None,
                            top_p=top_p if sampling else None, top_k=None,
                            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                            prompt_lookup_num_tokens=prompt_lookup_tokens or None)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    decoding: GenerationConfig | None = None,
    seed: int | None = None,
    streamer: Any = None,
    stop_event: threading.Event | None = None,
) -> list[Generation]:
    """Answers for tokenized prompts, in batches with left padding, in the prompts' order.

    Greedy unless ``decoding`` (a ``GenerationConfig`` such as :func:`chat_generation_config`) says
    otherwise; sampling draws from the torch RNG seeded with ``seed`` inside a private RNG scope, so the
    same seed gives the same answer and the caller's random streams are untouched. Prompts are grouped by
    length so a batch carries little padding. ``streamer`` (one prompt only) receives the tokens as they
    are generated; setting ``stop_event`` ends generation at the next token. The model's training state is
    restored afterwards.
    """
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"streaming needs exactly one prompt, got {len(prompts)}")
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    config = copy.deepcopy(decoding) if decoding is not None else GenerationConfig(do_sample=False, num_beams=1)
    config.update(max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=stop_ids, pad_token_id=pad_id)
    criteria = StoppingCriteriaList([StopOnEvent(stop_event)]) if stop_event is not None else None
    device = _device_of(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    with generation_mode(model):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, index in enumerate(chunk):
                ids = list(prompts[index])
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config, streamer=streamer, stopping_criteria=criteria)
            for row, index in enumerate(chunk):
                new = output[row, width:].tolist()
                stop_at = next((i for i, token in enumerate(new) if token in stop_ids), None)
                kept = new if stop_at is None else new[: stop_at + 1]
                answer = new if stop_at is None else new[:stop_at]  # the text never includes the stop token
                text = tokenizer.decode(answer, skip_special_tokens=True).strip()
                interrupted = stop_event is not None and stop_event.is_set() and stop_at is None
                results[index] = Generation(text, kept, stop_at is not None, interrupted)
    return results  # type: ignore[return-value]


class PromptTooLongError(FinSightError, ValueError):
    """A single message that does not fit the context together with the answer budget.

    Fix: shorten the message, or raise `--max_length` up to the model's context (`/reset` starts a new
    conversation).
    """


class ChatSession:
    """A multi-turn conversation with history kept inside ``max_length`` tokens.

    When the next prompt plus ``max_new_tokens`` would exceed ``max_length``, the oldest exchanges are
    dropped (the system prompt always stays), so a long chat keeps going with its recent context.
    ``decoding`` (default: greedy) and ``seed`` set how answers are drawn: with a seed, the same
    conversation gives the same answers; without one every answer draws a fresh seed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_length: int = 1024,
        max_new_tokens: int = 256,
        decoding: GenerationConfig | None = None,
        seed: int | None = None,
    ) -> None:
        if max_new_tokens >= max_length:
            raise GenerationSettingsError(f"max_new_tokens ({max_new_tokens}) must be smaller than max_length "
                                          f"({max_length}), which holds the conversation and the answer")
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = ChatEncoder(tokenizer, max_length)
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.history: list[dict[str, str]] = []
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.dropped_exchanges = 0
        self.decoding = decoding
        self.seed = seed
        self.answers = 0

    def messages(self, question: str) -> list[dict[str, str]]:
        """System prompt (none when empty), kept history, and the new question."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, *self.history, {"role": "user", "content": question}]

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

    def _next_seed(self) -> int:
        # Answer n of a seeded conversation uses seed + n: reproducible, yet not the same draw every turn.
        seed = self.seed + self.answers if self.seed is not None else random.SystemRandom().randrange(2**63)
        self.answers += 1
        return seed

    def ask(self, question: str, stream: TextIO | None = None) -> Generation:
        """Answer ``question`` in the context of the conversation so far, optionally streaming the text.

        While streaming, Ctrl-C (``KeyboardInterrupt``) ends this answer at the next token: the answer so
        far is returned with ``interrupted`` set and kept in the history, and the session goes on.
        """
        ids = self.prompt_ids(question)
        options = {"max_new_tokens": self.max_new_tokens, "stop_ids": self.stop_ids, "batch_size": 1,
                   "decoding": self.decoding, "seed": self._next_seed()}
        if stream is None:
            output = generate(self.model, self.tokenizer, [ids], **options)[0]
        else:
            output = self._streamed(ids, stream, options)
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": output.text}]
        return output

    def _streamed(self, ids: list[int], stream: TextIO, options: dict[str, Any]) -> Generation:
        """Generate in a worker thread and write its text as it comes, so Ctrl-C reaches this thread at once."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["output"] = generate(self.model, self.tokenizer, [ids], streamer=streamer, stop_event=stop,
                                            **options)[0]
            except BaseException as error:  # noqa: BLE001 - re-raised in the calling thread
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=work, name="finsight-chat-generate", daemon=True)
        worker.start()
        try:
            for text in streamer:
                stream.write(text)
                stream.flush()
        except KeyboardInterrupt:
            stop.set()
        worker.join()
        if "error" in result:
            raise result["error"]
        stream.write("\n")
        stream.flush()
        return result["output"]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()
