"""The train/validation split never puts one answer on both sides, and the data report counts the groups."""

from __future__ import annotations

import random

from helpers import rows_of, sample_sources, write_jsonl

from finsight import FinSightDataModule
from finsight.data.chat import IGNORE_INDEX
from finsight.data.split import answer_groups, answer_keys, normalized_answer, split_by_groups


def trained_answers(dataset, tokenizer) -> list[tuple[int, str]]:
    """(source_index, normalized answer) of every prepared sample, decoded from its trained tokens."""
    out = []
    for row in rows_of(dataset):
        ids = [t if label != IGNORE_INDEX else None for t, label in zip(row["input_ids"], row["labels"])]
        # Consecutive trained tokens form one answer and its end-of-turn token.
        spans, current = [], []
        for token in [*ids, None]:
            if token is None:
                if current:
                    spans.append(tokenizer.decode(current).replace("<|im_end|>", ""))
                current = []
            else:
                current.append(token)
        out.extend((row["source_index"], normalized_answer(span)) for span in spans)
    return out


def shared_across_split(dm, tokenizer) -> set[str]:
    train = {answer for _, answer in trained_answers(dm.train_dataset, tokenizer)}
    return train & {answer for _, answer in trained_answers(dm.val_dataset, tokenizer)}


def test_normalized_answers_ignore_case_spacing_and_punctuation():
    assert normalized_answer("It is 3 dollars.") == normalized_answer("  it is 3   Dollars ") == "it is 3 dollars"
    assert normalized_answer("$4.2 billion") == normalized_answer("4.2 billion.")
    assert normalized_answer("Up") != normalized_answer("Down")
    assert normalized_answer("👍") == "👍"


def test_groups_join_through_any_shared_answer():
    def chat(*answers):
        return [m for a in answers for m in ({"role": "user", "content": "q"}, {"role": "assistant", "content": a})]

    rows = [chat("A."), chat("b"), chat("a", "C"), chat("c!"), chat("d")]
    groups = answer_groups(answer_keys(rows))
    assert groups[0] == groups[2] == groups[3] and len({groups[0], groups[1], groups[4]}) == 3
    is_val, _ = split_by_groups(rows, [0] * 5, {0: 2}, seed=1)
    assert sum(is_val) <= 2 and (is_val[0] == is_val[2] == is_val[3])
    assert not is_val[0]  # the three-row group is larger than the validation share


def test_bundled_mixture_shares_no_answer_across_the_split(tiny_tokenizer, tmp_path):
    dm = FinSightDataModule(sources=sample_sources(intro_rows=60), tokenizer=tiny_tokenizer, max_length=512,
                            batch_size=2, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert shared_across_split(dm, tiny_tokenizer) == set()
    for s in dm.report.sources:
        assert s.val > 0  # every source still has validation rows
        assert 0 < s.answer_groups <= s.kept_after_fraction
        assert s.shared_answer_rows <= s.kept_after_fraction
    assert dm.report.source("intro").shared_answer_rows > 0  # the identity answers do repeat


def reworded_qa(n_answers: int, seed: int) -> tuple[list[dict], int]:
    """QA rows where most answers come back under reworded questions, in another case or punctuation."""
    rng = random.Random(seed)
    rows, shared = [], 0
    for i in range(n_answers):
        answer = f"Segment {i} earned ${rng.randint(1, 90)}.{rng.randint(0, 9)} billion in fiscal {2015 + i % 9}."
        copies = rng.choice([1, 1, 2, 3])
        shared += copies if copies > 1 else 0
        for k in range(copies):
            variant = [answer, answer.lower(), answer.rstrip(".") + "  ", answer.upper()][k % 4]
            question = [f"How much did segment {i} earn?", f"What were segment {i}'s earnings?",
                        f"Segment {i}: what did it earn in its fiscal year?"][k % 3]
            rows.append({"question": question, "answer": variant})
    rng.shuffle(rows)
    return rows, shared


def test_reworded_duplicates_stay_on_one_side(tiny_tokenizer, tmp_path):
    rows, shared = reworded_qa(120, seed=3)
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    # A second source repeats some answers of the first: groups span sources too.
    chats = [{"messages": [{"role": "user", "content": f"Tell me about segment {i}."},
                           {"role": "assistant", "content": rows[i]["answer"].upper()}]} for i in range(0, 60, 3)]
    chats += [{"messages": [{"role": "user", "content": f"Other question {i}?"},
                            {"role": "assistant", "content": f"A different answer number {i}."}]} for i in range(20)]
    other = write_jsonl(tmp_path / "chats.jsonl", chats)
    dm = FinSightDataModule(
        sources=[{"name": "qa", "path": str(path), "format": "qa"},
                 {"name": "chats", "path": str(other), "format": "messages"}],
        tokenizer=tiny_tokenizer, max_length=256, val_fraction=0.2, cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    assert shared_across_split(dm, tiny_tokenizer) == set()
    qa, chats_report = dm.report.source("qa"), dm.report.source("chats")
    assert qa.valid == len(rows)  # reworded duplicates are rows of their own, not dropped
    assert qa.answer_groups == 120  # one group per distinct answer
    assert qa.shared_answer_rows >= shared
    assert chats_report.answer_groups == len({normalized_answer(c["messages"][1]["content"]) for c in chats})
    assert chats_report.shared_answer_rows == 20  # each copied answer shares its group with qa rows
    assert 0 < qa.val <= round(0.2 * len(rows)) and 0 < chats_report.val <= 8
    assert "answer groups" in dm.report.markdown() and f"{qa.answer_groups} ({qa.shared_answer_rows} rows share)" in (
        dm.report.markdown())
