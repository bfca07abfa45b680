"""Sources and quality checks: every format, every drop reason, and the bundled samples' exact drops."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import bad_rows, company_kind, read_jsonl, reddit_kind, write_jsonl

from finsight.data import quality
from finsight.data.sources import (
    DEFAULT_SYSTEM_PROMPT,
    SAMPLES_DIR,
    SourceConfig,
    check_columns,
    conversations,
    read_source,
)

# What each kind of bad row in the samples must be dropped as.
REDDIT_REASONS = {
    "deleted": quality.DELETED, "removed": quality.DELETED, "empty_body": quality.EMPTY_TURN,
    "whitespace_body": quality.EMPTY_TURN, "short_body": quality.TOO_SHORT, "empty_title": quality.EMPTY_TURN,
    "low_score": quality.LOW_SCORE, "duplicate": quality.DUPLICATE, "body_none": quality.MISSING_FIELD,
}
COMPANY_REASONS = {
    "empty_answer": quality.EMPTY_TURN, "whitespace_question": quality.EMPTY_TURN,
    "answer_none": quality.MISSING_FIELD, "question_not_str": quality.MISSING_FIELD,
    "duplicate": quality.DUPLICATE, "answer_removed": quality.DELETED,
}


def read(name: str, path: str, fmt: str, **options) -> tuple[list[list[dict]], dict[str, int], list[dict]]:
    source = SourceConfig(name, path, fmt, **options)
    raw = read_source(source, seed=0)
    check_columns(source, raw)
    kept, dropped = conversations(source, raw)
    return kept, dropped, raw.rows


def test_bundled_reddit_drops_exactly_the_injected_rows():
    kept, dropped, rows = read("reddit", "bundled:reddit_finance", "reddit")
    plan = bad_rows(read_jsonl(SAMPLES_DIR / "reddit_finance.jsonl"), reddit_kind)
    assert Counter(plan.values()) == {"deleted": 3, "removed": 3, "empty_body": 3, "whitespace_body": 3,
                                      "short_body": 3, "empty_title": 3, "low_score": 2, "duplicate": 2,
                                      "body_none": 2}
    expected = Counter()
    for kind, count in Counter(plan.values()).items():
        expected[REDDIT_REASONS[kind]] += count
    assert dropped == dict(expected)
    assert sum(dropped.values()) == 24
    good = [row for index, row in enumerate(rows) if index not in plan]
    assert len(good) == len(kept) == 216
    for row, messages in zip(good, kept):  # every good row kept, in order, converted as documented
        question = row["title"].strip() + ("\n\n" + row["selftext"].strip() if row["selftext"].strip() else "")
        assert messages == [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": row["body"].strip()}]


def test_bundled_company_qa_drops_exactly_the_injected_rows():
    kept, dropped, rows = read("company_qa", "bundled:company_qa", "qa")
    plan = bad_rows(read_jsonl(SAMPLES_DIR / "company_qa.jsonl"), company_kind)
    # The generator's 2 duplicates, plus one question and answer quoted from two filings: without
    # context_in_system the model sees the same conversation twice, so the second copy is a duplicate.
    assert dropped == {quality.EMPTY_TURN: 6, quality.MISSING_FIELD: 6, quality.DUPLICATE: 3, quality.DELETED: 2}
    good = [row for index, row in enumerate(rows) if index not in plan]
    seen, unique = set(), []
    for row in good:
        if (row["question"].strip(), row["answer"].strip()) not in seen:
            seen.add((row["question"].strip(), row["answer"].strip()))
            unique.append(row)
    assert len(good) == 144 and len(unique) == len(kept) == 143
    assert [m[1]["content"] for m in kept] == [row["question"].strip() for row in unique]
    assert [m[2]["content"] for m in kept] == [row["answer"].strip() for row in unique]


def test_duplicates_are_keyed_on_what_the_model_sees(tmp_path):
    row = {"question": "How many segments does Acme report?", "answer": "Acme reports three segments in total.",
           "context": "We report three segments (2022).", "ticker": "ACME", "filing": "2022_10K"}
    other_year = {**row, "context": "We report three segments (2021).", "filing": "2021_10K"}
    path = write_jsonl(tmp_path / "qa.jsonl", [row, other_year, row])
    # The excerpt is not rendered: both filings give the model the same conversation.
    kept, dropped, _ = read("qa", str(path), "qa")
    assert len(kept) == 1 and dropped == {quality.DUPLICATE: 2}
    # With the excerpt in the system prompt the two filings are two different conversations.
    kept, dropped, _ = read("qa", str(path), "qa", context_in_system=True)
    assert len(kept) == 2 and dropped == {quality.DUPLICATE: 1}
    assert kept[0][0]["role"] == "system"
    assert kept[0][0]["content"].startswith(DEFAULT_SYSTEM_PROMPT)
    assert "We report three segments (2022)." in kept[0][0]["content"] and "ACME 2022_10K" in kept[0][0]["content"]
    assert "(2021)" in kept[1][0]["content"]


GOOD_ANSWER = "A good answer that is long enough to keep."


def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# (row of a ``messages`` source, reason it is dropped for)
BAD_ROWS = [
    ({"messages": "not a list"}, quality.MISSING_FIELD),
    ({"other": []}, quality.MISSING_FIELD),
    ({"messages": ["not a dict"]}, quality.MISSING_FIELD),
    (chat(("user", "Question?"), ("assistant", 42)), quality.MISSING_FIELD),
    (chat(("user", "Question?"), ("assistant", None)), quality.MISSING_FIELD),
    (chat(("user", ""), ("assistant", GOOD_ANSWER)), quality.EMPTY_TURN),
    (chat(("user", "Question?"), ("assistant", " \n\t ")), quality.EMPTY_TURN),
    (chat(("user", "Question?"), ("assistant", "[deleted]")), quality.DELETED),
    (chat(("user", "[removed]"), ("assistant", GOOD_ANSWER)), quality.DELETED),
    (chat(("user", "Question? " * 3000), ("assistant", GOOD_ANSWER)), quality.TOO_LONG),
    (chat(("bot", "Question?"), ("assistant", GOOD_ANSWER)), quality.BAD_ROLE_ORDER),
    (chat(("assistant", GOOD_ANSWER), ("user", "Question?")), quality.BAD_ROLE_ORDER),
    (chat(("user", "Question?"), ("user", "Again?")), quality.BAD_ROLE_ORDER),
    (chat(("user", "Question?")), quality.BAD_ROLE_ORDER),
    (chat(("user", "Question?"), ("assistant", GOOD_ANSWER), ("user", "And then?")), quality.BAD_ROLE_ORDER),
    (chat(("system", "Be brief.")), quality.BAD_ROLE_ORDER),
    ({"messages": []}, quality.BAD_ROLE_ORDER),
]


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS, ids=[f"{r}-{i}" for i, (_, r) in enumerate(BAD_ROWS)])
def test_each_bad_row_is_dropped_for_its_reason_and_good_rows_stay(tmp_path, row, reason):
    good = chat(("user", "What is a bond?"), ("assistant", GOOD_ANSWER))
    # The third row repeats the first, so every file also exercises exact duplicates.
    path = write_jsonl(tmp_path / "chats.jsonl", [good, row, good])
    kept, dropped, _ = read("chats", str(path), "messages")
    assert dropped == {reason: 1, quality.DUPLICATE: 1}
    assert kept == [[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *good["messages"]]]


def test_conversations_get_the_system_prompt_unless_they_have_one(tmp_path):
    own = chat(("system", "You are terse."), ("user", "What is a bond?"), ("assistant", GOOD_ANSWER))
    plain = chat(("user", "What is a stock?"), ("assistant", GOOD_ANSWER))
    path = write_jsonl(tmp_path / "chats.jsonl", [own, plain])
    source = SourceConfig("chats", str(path), "messages")
    kept, _ = conversations(source, read_source(source, 0), system_prompt="Custom prompt.")
    assert kept[0][0] == {"role": "system", "content": "You are terse."}
    assert kept[1][0] == {"role": "system", "content": "Custom prompt."}
    assert [len(m) for m in kept] == [3, 3]


def test_sharegpt_alpaca_and_intro_formats(tmp_path):
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [
        {"conversations": [{"from": "human", "value": "What is a bond?"}, {"from": "gpt", "value": GOOD_ANSWER},
                           {"from": "human", "value": "And a stock?"}, {"from": "gpt", "value": GOOD_ANSWER + "!"}]},
        {"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": GOOD_ANSWER}]},
    ])
    kept, dropped, _ = read("sg", str(sharegpt), "sharegpt")
    assert [m["role"] for m in kept[0]] == ["system", "user", "assistant", "user", "assistant"]
    assert dropped == {quality.BAD_ROLE_ORDER: 1}

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Explain APR.", "input": "For a credit card.", "output": GOOD_ANSWER},
        {"instruction": "Explain APY.", "input": "", "output": GOOD_ANSWER},
        {"instruction": "Explain fees.", "input": 3, "output": GOOD_ANSWER},
    ])
    kept, dropped, _ = read("alpaca", str(alpaca), "alpaca")
    assert [m[1]["content"] for m in kept] == ["Explain APR.\n\nFor a credit card.", "Explain APY."]
    assert dropped == {quality.MISSING_FIELD: 1}

    kept, dropped, rows = read("intro", None, "intro", rows=30)
    assert len(rows) == 30 and len(kept) + sum(dropped.values()) == 30
    assert set(dropped) <= {quality.DUPLICATE}
    assert all(m[0]["content"] == DEFAULT_SYSTEM_PROMPT and m[-1]["role"] == "assistant" for m in kept)


def test_reddit_score_filter_can_be_disabled():
    _, dropped, _ = read("reddit", "bundled:reddit_finance", "reddit", min_score=None)
    assert quality.LOW_SCORE not in dropped and sum(dropped.values()) == 22


def test_reddit_title_of_whitespace_is_dropped(tmp_path):
    body = "A long enough body for the answer to be kept as it is."
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"title": "How do I start?", "selftext": "", "body": body, "combined_score": 1.0},
        {"title": " \n", "selftext": "A real question in the text.", "body": body, "combined_score": 1.0},
        {"title": "", "selftext": "Another question.", "body": body + "!", "combined_score": 1.0},
    ])
    kept, dropped, _ = read("r", str(path), "reddit")
    assert len(kept) == 1 and dropped == {quality.EMPTY_TURN: 2}
