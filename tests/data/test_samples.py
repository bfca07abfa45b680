"""The sample files finsight ships (``bundled:<name>``): their schemas, their counts, and what the formats
make of them. The committed files are the source of truth; nothing here regenerates them."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from helpers import (
    COMPANY_KEYS,
    REDDIT_KEYS,
    bad_rows,
    company_kind,
    read_jsonl,
    reddit_kind,
    write_jsonl,
)

from finsight.data import quality
from finsight.data.sources import (
    SAMPLES_DIR,
    DataSourceError,
    SourceConfig,
    check_columns,
    conversations,
    read_source,
)

NUMBER = re.compile(r"\d[\d,.]*\d|\d")


def test_the_package_ships_exactly_the_three_samples():
    assert sorted(p.name for p in SAMPLES_DIR.iterdir()) == ["company_qa.jsonl", "intro.jsonl",
                                                               "reddit_finance.jsonl"]


def test_reddit_sample_has_the_datasets_schema_and_one_bad_row_in_ten():
    rows = read_jsonl(SAMPLES_DIR / "reddit_finance.jsonl")
    assert len(rows) == 240 and all(set(row) == REDDIT_KEYS for row in rows)
    assert len({row["id"] for row in rows}) == 240
    bad = bad_rows(rows, reddit_kind)
    assert Counter(bad.values()) == {"deleted": 3, "removed": 3, "empty_body": 3, "whitespace_body": 3,
                                     "short_body": 3, "empty_title": 3, "low_score": 2, "duplicate": 2,
                                     "body_none": 2}
    for index, row in enumerate(rows):
        assert re.fullmatch(r"t3_[0-9a-z]{6}", row["id"])
        if index not in bad:
            assert 40 <= len(row["body"].split()) <= 250 and row["combined_score"] > 0
    assert len({row["subreddit"] for row in rows}) >= 8


def test_company_qa_sample_has_the_datasets_schema_and_answers_found_in_their_excerpt():
    rows = read_jsonl(SAMPLES_DIR / "company_qa.jsonl")
    assert len(rows) == 160 and all(set(row) == COMPANY_KEYS for row in rows)
    bad = bad_rows(rows, company_kind)
    assert Counter(bad.values()) == {"question_not_str": 3, "whitespace_question": 3, "answer_none": 3,
                                     "empty_answer": 3, "duplicate": 2, "answer_removed": 2}
    for index, row in enumerate(rows):
        assert re.fullmatch(r"20(19|2[0-3])_10K", row["filing"]) and re.fullmatch(r"[A-Z]{4}", row["ticker"])
        if index not in bad:
            assert row["question"].endswith("?")
            for number in NUMBER.findall(row["answer"]):
                assert number in row["context"], (number, row)


def test_intro_sample_holds_500_distinct_alternating_identity_chats():
    rows = read_jsonl(SAMPLES_DIR / "intro.jsonl")
    assert len(rows) == 500 and all(set(row) == {"messages"} for row in rows)
    assert len({json.dumps(row) for row in rows}) == 500
    chats = [row["messages"] for row in rows]
    assert {len(m) for m in chats} == {2, 4}
    for messages in chats:
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in messages)
    replies = " ".join(m["content"] for c in chats for m in c if m["role"] == "assistant")
    for phrase in ("FinSight", "licensed", "real-time", "accounts", "professional"):
        assert phrase in replies
    assert len({c[0]["content"] for c in chats}) >= 12


def test_intro_source_takes_the_first_rows_of_the_bundled_chats_as_messages():
    rows = read_jsonl(SAMPLES_DIR / "intro.jsonl")
    source = SourceConfig("intro", None, "intro", rows=120)
    assert source.path == "bundled:intro"
    raw = read_source(source, seed=0)
    check_columns(source, raw)
    kept, dropped = conversations(source, raw, "You are FinSight.")
    assert raw.rows == rows[:120]
    assert set(dropped) <= {quality.DUPLICATE} and len(kept) + sum(dropped.values()) == 120
    assert kept[0] == [{"role": "system", "content": "You are FinSight."}, *rows[0]["messages"]]
    # The same source read as plain messages gives the same conversations: intro adds only the row count.
    plain = SourceConfig("plain", "bundled:intro", "messages")
    assert conversations(plain, read_source(plain, seed=0), "You are FinSight.")[0][:len(kept)] == kept


def test_intro_takes_its_own_file_and_refuses_more_rows_than_a_file_holds(tmp_path):
    mine = write_jsonl(tmp_path / "who.jsonl", [{"messages": [{"role": "user", "content": f"Who are you? ({i})"},
                                                             {"role": "assistant", "content": "I am Ledger."}]}
                                                for i in range(3)])
    with pytest.raises(DataSourceError, match="an intro source of your own needs assistant_name"):
        SourceConfig("intro", str(mine), "intro", rows=2)
    source = SourceConfig("intro", str(mine), "intro", rows=2, assistant_name="Ledger")
    assert SourceConfig("intro", None, "intro").assistant_name == "FinSight"  # the bundled chats' name
    kept, dropped = conversations(source, read_source(source, seed=0), "sys")
    assert [m[1]["content"] for m in kept] == ["Who are you? (0)", "Who are you? (1)"] and dropped == {}
    for path, held in ((None, 500), (str(mine), 3)):
        with pytest.raises(DataSourceError) as exc_info:
            read_source(SourceConfig("intro", path, "intro", rows=held + 1, assistant_name="Ledger"), seed=0)
        assert str(exc_info.value).startswith(f"source 'intro': rows is {held + 1}, but ")
        assert f"holds {held} readable conversations" in str(exc_info.value)
    with pytest.raises(DataSourceError, match="rows must be a whole number of conversations, at least 1; got 0"):
        SourceConfig("intro", None, "intro", rows=0)
