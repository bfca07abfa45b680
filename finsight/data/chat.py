"""Chat-template rendering and the assistant-only label mask.

The mask does not rely on ``{% generation %}`` markers (SmolLM2's and Llama-2's templates have none).
For assistant turn ``i`` the template is rendered twice: the conversation up to the turn with the
generation prompt (``prefix``), and up to and including the turn (``full``). The characters between the
two are what the model must produce: the answer and the template's end-of-turn token, which is trained so
the model learns to stop. The whole conversation is tokenized once with offsets, and a token is trained
when it starts inside one of those character spans. Everything else (system, user, template tokens) gets
label ``-100``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used to build an assistant mask."""


def template_accepts_system(tokenizer: Any) -> bool:
    """Some templates (Mistral's) raise on a system role; those get it folded into the first user turn."""
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]
    try:
        tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja raises TemplateError through raise_exception()
        return False
    return True


def fold_system(messages: list[dict]) -> list[dict]:
    """Merge a system message into the first user turn, for templates without a system role."""
    if not messages or messages[0]["role"] != "system":
        return messages
    first_user = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [first_user, *messages[2:]]


class ChatEncoder:
    """Turns conversations into ``input_ids`` and assistant-only ``labels`` with the tokenizer's template.

    It is a plain picklable object so ``datasets.map(num_proc=N)`` can ship it to worker processes.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ChatTemplateError("the assistant mask needs a fast tokenizer (offset mapping)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.accepts_system = template_accepts_system(tokenizer)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as training and generation see it."""
        if not self.accepts_system:
            messages = fold_system(messages)
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of every assistant turn."""
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:index], add_generation_prompt=True)
            full = self.render(messages[: index + 1])
            if not full.startswith(prefix):
                raise ChatTemplateError(
                    "the chat template renders a conversation differently from its own prefix, so the "
                    "assistant turns cannot be located"
                )
            spans.append((len(prefix), len(full)))
        # The last render covers the whole conversation when it ends with the assistant (checked upstream).
        text = self.render(messages)
        return text, spans

    def encode_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """``datasets.map(batched=True)`` function: messages → input_ids, labels, length, trained count."""
        texts, all_spans = [], []
        for messages in batch["messages"]:
            text, spans = self.assistant_spans(messages)
            texts.append(text)
            all_spans.append(spans)
        encoded = self.tokenizer(
            texts, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
            max_length=self.max_length,
        )
        labels, lengths, trained = [], [], []
        for ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans):
            starts = np.asarray([start for start, _ in offsets])
            inside = np.zeros(len(ids), dtype=bool)
            for begin, end in spans:
                inside |= (starts >= begin) & (starts < end)
            row = np.where(inside, np.asarray(ids), IGNORE_INDEX)
            labels.append(row.tolist())
            lengths.append(len(ids))
            trained.append(int(inside.sum()))
        return {"input_ids": encoded["input_ids"], "labels": labels, "length": lengths, "trained": trained}
