"""The train/validation split, kept free of leakage: rows that share an answer stay on one side.

A reworded question with the same answer is the same lesson: with one copy in train and the other in
validation, the validation loss and ``finsight test``'s scores measure recall of a trained answer, not
generalisation. So rows are grouped by their normalized assistant answers (case, spacing and punctuation
ignored; a conversation with several answers joins the groups of all of them, and exact duplicates share
every answer), and the split moves whole groups. Which groups go to validation depends only on their
answers and the seed, so adding or removing another source leaves a source's split as it was unless the
two share answers.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

_WORD = re.compile(r"\w+")


def normalized_answer(text: str) -> str:
    """The answer as a comparison key: Unicode-normalized, case-folded, words only (punctuation and
    spacing ignored, so "It is 3 dollars." and "it is 3 dollars" are one answer)."""
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return " ".join(words) if words else text.strip()  # an answer of only symbols or emoji is its own key


def answer_keys(conversations: list[list[dict]]) -> list[list[str]]:
    """The normalized assistant answers of every conversation."""
    return [[normalized_answer(m["content"]) for m in messages if m["role"] == "assistant"]
            for messages in conversations]


def answer_groups(keys: list[list[str]]) -> list[int]:
    """A group id per conversation (given its ``answer_keys``): conversations that share a normalized
    answer, directly or through others, get the same id (union-find over the answers)."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for index, answers in enumerate(keys):
        for key in answers:
            other = first_with.setdefault(key, index)
            if other != index:
                parent[root(index)] = root(other)
    return [root(i) for i in range(len(keys))]


def split_by_groups(conversations: list[list[dict]], source_of: list[int], val_rows: dict[int, int],
                    seed: int) -> tuple[list[bool], list[int]]:
    """Which conversations are validation rows (``True``) and their group ids.

    ``val_rows`` is the number of validation rows wanted per source index. Groups are visited in an order
    drawn from their answers and the seed, and a group goes to validation whole when it fits in what each
    of its sources still needs; a group too large to fit stays in train. A source whose every group is
    larger than its share therefore gets fewer validation rows (the data report shows how many).
    """
    keys = answer_keys(conversations)
    groups = answer_groups(keys)
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)

    def rank(group: int) -> str:
        key = min(key for i in members[group] for key in keys[i])
        return hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).hexdigest()

    is_val = [False] * len(conversations)
    needed = {source: count for source, count in val_rows.items() if count > 0}
    for group in sorted(members, key=rank):
        if not needed:
            break
        counts = Counter(source_of[i] for i in members[group])
        if all(needed.get(source, 0) >= count for source, count in counts.items()):
            for i in members[group]:
                is_val[i] = True
            for source, count in counts.items():
                needed[source] -= count
                if not needed[source]:
                    del needed[source]
    return is_val, groups
