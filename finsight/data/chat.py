"""Chat-template rendering and the assistant-only label mask.

The mask does not rely on ``{% generation %}`` markers (SmolLM2's and Llama-2's templates have none).
For assistant turn ``i`` the template is rendered twice: the conversation up to the turn with the
generation prompt (``prefix``), and up to and including the turn (``full``). The characters between the
two, less trailing whitespace, are what the model must produce: the answer and the template's end-of-turn
token (``<|im_end|>``, ``</s>``), which is trained so the model learns to stop. The newline a template
writes after that token is template layout and is not trained. The whole conversation is tokenized once
with offsets, and a token is trained when it starts inside one of those character spans. Everything else
(system, user, template tokens) gets label ``-100``.

The render of the last assistant turn is the whole conversation, so a single-turn conversation costs two
renders, and every conversation of a batch is rendered in one ``apply_chat_template`` call per kind.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from finsight import compat
from finsight.errors import FinSightError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class ChatTemplateError(FinSightError, ValueError):
    """The tokenizer's chat template cannot be used to build an assistant mask.

    Fix: use an instruction-tuned model whose chat template renders each assistant turn as given (most chat
    models do); a base model without a template cannot mark what to train.
    """


def template_accepts_system(tokenizer: PreTrainedTokenizerBase) -> bool:
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
    if len(messages) == 1:
        return [{"role": "user", "content": messages[0]["content"]}]
    first_user = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [first_user, *messages[2:]]


class ChatEncoder:
    """Turns conversations into ``input_ids`` and assistant-only ``labels`` with the tokenizer's template.

    It is a plain picklable object so ``datasets.map(num_proc=N)`` can ship it to worker processes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"tokenizer {name!r} has no chat template; finsight renders every conversation with the "
                "tokenizer's own template (use an instruction-tuned model or set tokenizer.chat_template)"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ChatTemplateError(f"tokenizer {name!r} is not a fast tokenizer; the assistant mask needs "
                                    "its offset mapping")
        if max_length < 1:
            raise ChatTemplateError(f"max_length must be a positive number of tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.accepts_system = template_accepts_system(tokenizer)
        self._direct = _direct_renderer(tokenizer, self.accepts_system)
        # Special tokens a conversation may be cut after (see _shared_head): ones that do not swallow the
        # whitespace after them.
        self._cut_tokens = sorted({token.content for token in tokenizer.added_tokens_decoder.values()
                                   if token.special and not token.rstrip and not token.single_word})
        self._head_cache: dict[str, list[int] | None] = {}

    @classmethod
    def untruncated(cls, tokenizer: PreTrainedTokenizerBase) -> ChatEncoder:
        """An encoder that never cuts a conversation: prompts rendered for generation, not for training.

        ``max_length`` bounds training rows; a prompt to answer is rendered whole, and the generation model
        reports one that does not fit its context.
        """
        return cls(tokenizer, max_length=1 << 30)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_direct"] = None  # a compiled jinja template does not pickle; workers compile their own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._direct = _direct_renderer(self.tokenizer, self.accepts_system)

    def _render_many(self, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        if not conversations:
            return []
        try:
            if self._direct is not None:
                return [self._direct(messages, add_generation_prompt) for messages in conversations]
            return self.tokenizer.apply_chat_template(
                conversations, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # noqa: BLE001 - jinja's TemplateError and whatever the template raises
            raise ChatTemplateError(f"the chat template failed to render a conversation: {err}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as training and generation see it."""
        if not self.accepts_system:
            messages = fold_system(messages)
        return self._render_many([messages], add_generation_prompt)[0]

    def assistant_spans_batch(self, batch: list[list[dict]]) -> tuple[list[str], list[list[tuple[int, int]]]]:
        """The rendered conversations and the character spans of every assistant turn of each."""
        if not self.accepts_system:
            batch = [fold_system(messages) for messages in batch]
        prefixes, fulls, owners = [], [], []
        for number, messages in enumerate(batch):
            for index, message in enumerate(messages):
                if message["role"] == "assistant":
                    prefixes.append(messages[:index])
                    fulls.append(messages[: index + 1])
                    owners.append(number)
        # Conversations that do not end with the assistant (not produced by the checks) are rendered whole.
        unfinished = [n for n, messages in enumerate(batch) if not messages or messages[-1]["role"] != "assistant"]
        prefix_texts = self._render_many(prefixes, add_generation_prompt=True)
        full_texts = self._render_many(fulls, add_generation_prompt=False)
        texts: list[str | None] = [None] * len(batch)
        for number, text in zip(unfinished, self._render_many([batch[n] for n in unfinished], False)):
            texts[number] = text
        spans: list[list[tuple[int, int]]] = [[] for _ in batch]
        turns: list[list[str]] = [[] for _ in batch]
        for number, prefix, full in zip(owners, prefix_texts, full_texts):
            if not full.startswith(prefix):
                raise ChatTemplateError(
                    "the chat template renders a conversation differently from its own prefix, so the "
                    "assistant turns cannot be located"
                )
            spans[number].append((len(prefix), len(full.rstrip())))
            turns[number].append(full)
        for number, text in enumerate(texts):
            if text is None:
                texts[number] = text = turns[number][-1]  # the last turn's render is the whole conversation
            # Spans of earlier turns are positions in their own render; they hold only if that render is
            # how the whole conversation begins.
            if not all(text.startswith(full) for full in turns[number]):
                raise ChatTemplateError(
                    "the chat template renders earlier turns differently once later turns follow, so the "
                    "assistant turns cannot be located"
                )
        return texts, spans  # type: ignore[return-value]

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns (trained characters)."""
        texts, spans = self.assistant_spans_batch([messages])
        return texts[0], spans[0]

    def encode_batch(self, batch: dict[str, list]) -> dict[str, list]:
        """``datasets.map(batched=True)`` function: messages → input_ids, labels, length, trained count."""
        texts, all_spans = self.assistant_spans_batch(batch["messages"])
        head, head_ids = self._shared_head(texts, all_spans)
        cut = len(head)
        rests = [text[cut:] for text in texts]
        encoded = self.tokenizer(rests, add_special_tokens=False, truncation=True,
                                 max_length=self.max_length - len(head_ids))
        input_ids, labels, lengths, trained = [], [], [], []
        for rest_ids, encoding, rest, spans in zip(encoded["input_ids"], encoded.encodings, rests, all_spans):
            ids = head_ids + rest_ids
            row = [IGNORE_INDEX] * len(ids)
            count = 0
            for begin, end in spans:
                first, last = _token_range(encoding, len(rest_ids), len(rest), begin - cut, end - cut)
                first, last = first + len(head_ids), last + len(head_ids)
                row[first:last] = ids[first:last]
                count += last - first
            if row and row[0] != IGNORE_INDEX:
                count -= 1  # nothing predicts the first token: it is never a term of the loss
            input_ids.append(ids)
            labels.append(row)
            lengths.append(len(ids))
            trained.append(count)
        return {"input_ids": input_ids, "labels": labels, "length": lengths, "trained": trained}

    def _shared_head(self, texts: list[str], all_spans: list[list[tuple[int, int]]]) -> tuple[str, list[int]]:
        """The start every conversation of the batch shares (the system block), and its tokens.

        Most conversations begin with the same system prompt, a quarter of an average sample's tokens.
        Cut right after a special token, the rest of a conversation tokenizes independently of it, so the
        head is tokenized once per batch. The cut holds no trained character, and it is used only once a
        conversation has tokenized identically both ways (a tokenizer that prefixes every sequence, such
        as SentencePiece's ``▁``, fails that check and keeps whole-text tokenization).
        """
        if len(texts) < 2 or not self._cut_tokens:
            return "", []
        limit = min([len(os.path.commonprefix(texts))] + [begin for spans in all_spans for begin, _ in spans])
        first = texts[0]
        starts = {token: first.rfind(token, 0, limit) for token in self._cut_tokens}
        cut = max((start + len(token) for token, start in starts.items() if start >= 0), default=0)
        head = first[:cut]
        if not head:
            return "", []
        if head not in self._head_cache:
            if len(self._head_cache) >= 64:  # many distinct system prompts: keep the memory bounded
                self._head_cache.clear()
            head_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"]
            rest_ids = self.tokenizer(first[cut:], add_special_tokens=False)["input_ids"]
            whole = self.tokenizer(first, add_special_tokens=False)["input_ids"]
            usable = head_ids + rest_ids == whole and len(head_ids) < self.max_length
            self._head_cache[head] = head_ids if usable else None
        head_ids = self._head_cache[head]
        return (head, head_ids) if head_ids is not None else ("", [])


def _token_range(encoding: Any, n_tokens: int, n_chars: int, begin: int, end: int) -> tuple[int, int]:
    """Tokens that start inside the characters ``[begin, end)``: a contiguous range, since the start offsets
    of one sequence never go back. Found with two ``char_to_token`` look-ups; the full offset list is used
    only where a boundary character belongs to no token (trimmed whitespace, or cut off by truncation)."""
    bounds = []
    for position in (begin, end):
        if position >= n_chars:
            bounds.append(n_tokens)
            continue
        token = encoding.char_to_token(position)
        if token is None:
            starts = [start for start, _ in encoding.offsets]
            return bisect_left(starts, begin), bisect_left(starts, end)
        start, _ = encoding.token_to_chars(token)
        bounds.append(token if start >= position else token + 1)
    return bounds[0], bounds[1]


def _direct_renderer(tokenizer: PreTrainedTokenizerBase, accepts_system: bool):
    """The compiled template as a plain function, when it renders exactly like ``apply_chat_template``.

    ``apply_chat_template`` copies and normalizes every conversation before rendering it, which costs as
    much as the rendering itself; on a large dataset that is seconds. The compiled template (transformers'
    own, cached per template) is used only if it gives the very same text on probe conversations, so a
    template or a transformers version where they differ keeps the public path.
    """
    try:
        template = compat.transformers.compiled_chat_template(tokenizer.get_chat_template())
        special = dict(tokenizer.special_tokens_map)
    except Exception:  # noqa: BLE001 - any change in those internals means: use the public path
        return None

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special)

    probe = [{"role": "user", "content": "What is a bond?"}, {"role": "assistant", "content": "A loan."},
             {"role": "user", "content": "And a stock?"}, {"role": "assistant", "content": "A share."}]
    if accepts_system:
        probe = [{"role": "system", "content": "Be brief."}, *probe]
    try:
        for cut in range(1, len(probe) + 1):
            for generation in (False, True):
                expected = tokenizer.apply_chat_template(probe[:cut], tokenize=False,
                                                         add_generation_prompt=generation)
                if render(probe[:cut], generation) != expected:
                    return None
    except Exception:  # noqa: BLE001 - a template that rejects a probe prefix keeps the public path
        return None
    return render
