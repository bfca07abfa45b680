"""Helpers for the data tests: files written at runtime and a chat rendering that does not use the library.

The rendering here is written by hand from the template's definition and tokenized one segment at a time,
so a mask bug in ``ChatEncoder`` (which renders with the tokenizer's template and maps character spans
through offsets) cannot be reproduced by the check itself.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from finsight.data.chat import IGNORE_INDEX

Segment = tuple[str, bool]  # text, trained


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    """A CSV file with a header row."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def chatml_segments(messages: list[dict]) -> list[Segment]:
    """ChatML as the test tokenizer's template writes it; trained: each answer and its ``<|im_end|>``."""
    segments: list[Segment] = []
    for message in messages:
        header = f"<|im_start|>{message['role']}\n"
        if message["role"] == "assistant":
            segments += [(header, False), (message["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((header + message["content"] + "<|im_end|>\n", False))
    return segments


# Mistral-like: no system role (raise_exception), answers end with the EOS token.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def no_system_segments(messages: list[dict], bos: str, eos: str) -> list[Segment]:
    """The Mistral-like template by hand, with the system prompt folded into the first user turn."""
    if messages[0]["role"] == "system":
        messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                    *messages[2:]]
    segments: list[Segment] = [(bos, False)]
    for message in messages:
        if message["role"] == "user":
            segments.append(("[INST] " + message["content"] + " [/INST]", False))
        else:
            segments.append((message["content"] + eos, True))
    return segments


# Llama-2's template: system in <<SYS>> inside the first [INST]; answers are " answer </s>".
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def llama2_segments(messages: list[dict], bos: str, eos: str) -> list[Segment]:
    """Llama-2's layout by hand; trained: `` answer </s>`` (the space before the EOS token included)."""
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    segments: list[Segment] = []
    for index, message in enumerate(messages):
        if message["role"] == "user":
            content = message["content"]
            if index == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            segments.append((f"{bos}[INST] {content.strip()} [/INST]", False))
        else:
            segments.append((f" {message['content'].strip()} {eos}", True))
    return segments


def encode_segments(tokenizer: Any, segments: list[Segment]) -> tuple[list[int], list[int]]:
    """Token ids of the segments tokenized one by one, and labels: the id where trained, else -100."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def rows_of(dataset: Any) -> list[dict]:
    """A prepared split as plain rows."""
    return dataset.with_format(None).to_list()


# ------------------------------------------------------------------------------ the bundled sample files

REDDIT_KEYS = {"id", "title", "selftext", "body", "subreddit", "z_score", "normalized_score",
               "comment_normalized_score", "combined_score"}
COMPANY_KEYS = {"question", "answer", "context", "ticker", "filing"}


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSON-lines file, parsed."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def reddit_kind(row: dict, seen: set) -> str | None:
    """What is wrong with a Reddit-shaped row, judged from the row alone (None: a good row)."""
    body = row["body"]
    key = (row["title"], row["selftext"], body)
    duplicate = key in seen
    seen.add(key)
    if body is None:
        return "body_none"
    if body in ("[deleted]", "[removed]"):
        return body.strip("[]")
    if body == "":
        return "empty_body"
    if not body.strip():
        return "whitespace_body"
    if len(body.split()) < 5:
        return "short_body"
    if not row["title"].strip():
        return "empty_title"
    if row["comment_normalized_score"] < 0.05 and row["combined_score"] < 0:
        return "low_score"
    return "duplicate" if duplicate else None


def company_kind(row: dict, seen: set) -> str | None:
    """What is wrong with a 10-K QA row, judged from the row alone (None: a good row)."""
    key = (row["question"], row["answer"], row["context"])
    duplicate = key in seen
    seen.add(key)
    if not isinstance(row["question"], str):
        return "question_not_str"
    if not row["question"].strip():
        return "whitespace_question"
    if row["answer"] is None:
        return "answer_none"
    if row["answer"] == "":
        return "empty_answer"
    if row["answer"] == "[removed]":
        return "answer_removed"
    return "duplicate" if duplicate else None


def bad_rows(rows: list[dict], classify) -> dict[int, str]:
    """Row index → what is wrong with it, for every bad row of a file."""
    seen: set = set()
    kinds = {index: classify(row, seen) for index, row in enumerate(rows)}
    return {index: kind for index, kind in kinds.items() if kind is not None}
