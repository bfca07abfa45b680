"""The synthetic data generator of the benchmarks (``benchmarks/finbench/synthetic.py``, not part of the
package): schemas, injected bad rows, determinism, and that it still writes the committed sample files."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from finbench import synthetic
from finbench.synthetic import (
    COMPANY_QA_BAD_KINDS,
    REDDIT_BAD_KINDS,
    SUBREDDITS,
    company_qa_rows,
    intro_conversations,
    reddit_rows,
    write_samples,
    write_synthetic,
)
from helpers import COMPANY_KEYS, REDDIT_KEYS, company_kind, read_jsonl, reddit_kind

from finsight.data.sources import SAMPLES_DIR

NUMBER = re.compile(r"\d[\d,.]*\d|\d")


def kind_counts(rows: list[dict], classify) -> Counter:
    seen: set = set()
    return Counter(classify(row, seen) for row in rows)


def expected_counts(n_bad: int, kinds: tuple[str, ...]) -> Counter:
    return Counter(kinds[i % len(kinds)] for i in range(n_bad))


# ------------------------------------------------------------------ schemas


def test_reddit_good_rows_match_schema() -> None:
    rows = reddit_rows(500, seed=1)
    assert len(rows) == 500
    assert len({r["id"] for r in rows}) == 500
    for row in rows:
        assert set(row) == REDDIT_KEYS
        assert re.fullmatch(r"t3_[0-9a-z]{6}", row["id"])
        assert isinstance(row["title"], str) and row["title"].strip()
        assert isinstance(row["selftext"], str)
        assert isinstance(row["body"], str)
        assert 40 <= len(row["body"].split()) <= 250
        assert row["subreddit"] in SUBREDDITS
        for key in (
            "z_score",
            "normalized_score",
            "comment_normalized_score",
            "combined_score",
        ):
            assert isinstance(row[key], float)
        assert 0.0 <= row["normalized_score"] <= 1.0
        assert 0.0 <= row["comment_normalized_score"] <= 1.0
        assert row["combined_score"] > 0
    assert any(r["selftext"] == "" for r in rows)
    assert any(r["selftext"] for r in rows)
    assert len({r["subreddit"] for r in rows}) == len(SUBREDDITS)


def test_company_good_rows_match_schema_and_context_holds_the_answer() -> None:
    rows = company_qa_rows(500, seed=1)
    assert len(rows) == 500
    for row in rows:
        assert set(row) == COMPANY_KEYS
        for key in COMPANY_KEYS:
            assert isinstance(row[key], str) and row[key].strip(), key
        assert re.fullmatch(r"20(19|2[0-3])_10K", row["filing"])
        assert re.fullmatch(r"[A-Z]{4}", row["ticker"])
        assert row["question"].endswith("?")
        for number in NUMBER.findall(row["answer"]):
            assert number in row["context"], (number, row)
    assert len({r["ticker"] for r in rows}) >= 20


def test_intro_conversations_alternate_and_introduce_finsight() -> None:
    conversations = intro_conversations(200, seed=4)
    assert len(conversations) == 200
    for messages in conversations:
        assert len(messages) in (2, 4)
        for i, message in enumerate(messages):
            assert set(message) == {"role", "content"}
            assert message["role"] == ("user" if i % 2 == 0 else "assistant")
            assert message["content"].strip()
    assert any(len(m) == 4 for m in conversations)
    assert any(len(m) == 2 for m in conversations)
    replies = " ".join(
        m["content"] for c in conversations for m in c if m["role"] == "assistant"
    )
    for phrase in ("FinSight", "licensed", "real-time", "accounts", "professional"):
        assert phrase in replies
    assert len({c[0]["content"] for c in conversations}) >= 12


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "generate",
    [
        lambda seed: reddit_rows(200, seed=seed, bad_share=0.1),
        lambda seed: company_qa_rows(200, seed=seed, bad_share=0.1),
        lambda seed: intro_conversations(100, seed=seed),
    ],
    ids=["reddit", "company_qa", "intro"],
)
def test_same_seed_same_rows_different_seed_different_rows(generate) -> None:
    assert generate(5) == generate(5)
    assert generate(5) != generate(6)


# -------------------------------------------------------------------- bad rows


def test_reddit_bad_share_injects_each_kind_round_robin() -> None:
    rows = reddit_rows(900, seed=3, bad_share=0.1)
    counts = kind_counts(rows, reddit_kind)
    assert counts.pop(None) == 810
    assert counts == expected_counts(90, REDDIT_BAD_KINDS)
    assert counts == Counter({kind: 10 for kind in REDDIT_BAD_KINDS})


def test_company_bad_share_injects_each_kind_round_robin() -> None:
    rows = company_qa_rows(600, seed=3, bad_share=0.1)
    counts = kind_counts(rows, company_kind)
    assert counts.pop(None) == 540
    assert counts == Counter({kind: 10 for kind in COMPANY_QA_BAD_KINDS})


def test_no_bad_rows_without_bad_share() -> None:
    assert set(kind_counts(reddit_rows(1000, seed=2), reddit_kind)) == {None}
    assert set(kind_counts(company_qa_rows(1000, seed=2), company_kind)) == {None}


def test_first_row_stays_good_and_ids_stay_unique_at_high_bad_share() -> None:
    rows = reddit_rows(50, seed=9, bad_share=0.9)
    assert reddit_kind(rows[0], set()) is None
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("bad_share", [-0.1, 1.5])
def test_bad_share_out_of_range_is_rejected(bad_share: float) -> None:
    with pytest.raises(ValueError):
        reddit_rows(10, bad_share=bad_share)
    with pytest.raises(ValueError):
        company_qa_rows(10, bad_share=bad_share)


# --------------------------------------------------------------------- variety


def test_reddit_duplicate_share_is_small() -> None:
    rows = reddit_rows(20000, seed=0)
    keys = [(r["title"], r["selftext"], r["body"]) for r in rows]
    assert 1 - len(set(keys)) / len(keys) < 0.02


def test_reddit_templates_are_varied_before_deduplication() -> None:
    # The generator redraws accidental duplicates; this checks the raw draws are varied anyway.
    rng = synthetic.random.Random(0)
    keys = [synthetic._reddit_content(rng)[1:] for _ in range(20000)]
    assert 1 - len(set(keys)) / len(keys) < 0.02
    assert len(synthetic._REDDIT_BUILDERS) >= 40
    assert len({body for _, _, body in keys}) > 18000


# ---------------------------------------------------------------------- writing


def test_write_synthetic_splits_two_thirds_one_third(tmp_path: Path) -> None:
    paths = write_synthetic(tmp_path / "out", n_conversations=20000, seed=0)
    assert set(paths) == {"reddit_finance", "company_qa"}
    reddit = read_jsonl(paths["reddit_finance"])
    company = read_jsonl(paths["company_qa"])
    assert paths["reddit_finance"].name == "reddit_finance.jsonl"
    assert paths["company_qa"].name == "company_qa.jsonl"
    assert len(reddit) == 13333
    assert len(company) == 6667
    assert all(set(r) == REDDIT_KEYS for r in reddit)
    assert all(set(r) == COMPANY_KEYS for r in company)
    reddit_bad = kind_counts(reddit, reddit_kind)
    company_bad = kind_counts(company, company_kind)
    assert len(reddit) - reddit_bad[None] == round(13333 * 0.02)
    assert len(company) - company_bad[None] == round(6667 * 0.02)


def test_main_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic.main(
        ["--out", str(tmp_path), "--rows", "30", "--seed", "2", "--bad-share", "0"]
    )
    assert len(read_jsonl(tmp_path / "reddit_finance.jsonl")) == 20
    assert len(read_jsonl(tmp_path / "company_qa.jsonl")) == 10
    assert "reddit_finance" in capsys.readouterr().out


# ---------------------------------------------------------------------- samples


def test_the_generator_still_writes_the_committed_sample_files(tmp_path: Path) -> None:
    written = write_samples(tmp_path)
    assert set(written) == {p.stem for p in SAMPLES_DIR.glob("*.jsonl")}
    for name, path in written.items():
        assert path.read_bytes() == (SAMPLES_DIR / path.name).read_bytes(), name
