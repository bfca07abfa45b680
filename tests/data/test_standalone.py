"""The data module used the way another project would: its own files, its own tokenizer, no Trainer."""

from __future__ import annotations

from helpers import chatml_segments, encode_segments, rows_of, write_csv, write_jsonl

from finsight import FinSightDataModule

TOPICS = ["an index fund", "a bond ladder", "a Roth IRA", "dollar-cost averaging", "an expense ratio",
          "a credit score", "an emergency fund", "compound interest", "a brokerage account", "inflation"]


def chats() -> list[dict]:
    rows = []
    for i in range(40):
        topic = TOPICS[i % len(TOPICS)]
        messages = [{"role": "user", "content": f"Explain {topic} simply, please (question {i})."},
                    {"role": "assistant", "content": f"In short, {topic} is explained here in answer {i}."}]
        if i % 4 == 0:
            messages += [{"role": "user", "content": f"Give an example for question {i}."},
                         {"role": "assistant", "content": f"For example, someone uses {topic} in case {i}."}]
        rows.append({"messages": messages})
    rows.append({"messages": [{"role": "user", "content": "No answer here."}]})  # bad: no assistant turn
    rows.append(rows[3])  # bad: duplicate
    return rows


def alpaca() -> list[list[str]]:
    rows = [[f"Define {TOPICS[i % 10]} for case {i}.", "For a beginner." if i % 3 == 0 else "",
             f"{TOPICS[i % 10].capitalize()} is defined for case {i} in plain words."] for i in range(30)]
    rows.append(["Define nothing.", "", " "])  # bad: no answer
    return rows


def test_outside_project_uses_the_data_module(tmp_path, tiny_tokenizer):
    messages_file = write_jsonl(tmp_path / "chats.jsonl", chats())
    alpaca_file = write_csv(tmp_path / "alpaca.csv", ["instruction", "input", "output"], alpaca())
    dm = FinSightDataModule(
        sources=[{"name": "chats", "path": str(messages_file), "format": "messages", "fraction": 0.5},
                 {"name": "howto", "path": str(alpaca_file), "format": "alpaca", "fraction": 1.0}],
        tokenizer=tiny_tokenizer, batch_size=4, val_fraction=0.1, max_length=256, system_prompt="Be precise.",
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("fit")

    chats_report, howto = dm.report.source("chats"), dm.report.source("howto")
    assert (chats_report.rows_read, chats_report.valid, chats_report.dropped) == (
        42, 40, {"bad_role_order": 1, "duplicate": 1})
    assert (howto.rows_read, howto.valid, howto.dropped) == (31, 30, {"empty_turn": 1})
    assert chats_report.kept_after_fraction == 20 and howto.kept_after_fraction == 30
    assert (chats_report.train, chats_report.val) == (18, 2)
    assert (howto.train, howto.val) == (27, 3)
    train = rows_of(dm.train_dataset)
    assert len(train) == 45 and sum(r["source_index"] == 0 for r in train) == 18

    # Every sample is one of the source conversations rendered by hand, with only answers trained.
    expected = {}
    for row in chats()[:40]:
        ids, labels = encode_segments(tiny_tokenizer, chatml_segments(
            [{"role": "system", "content": "Be precise."}, *row["messages"]]))
        expected[tuple(ids)] = labels
    for instruction, extra, output in alpaca()[:30]:
        prompt = instruction + ("\n\n" + extra if extra else "")
        ids, labels = encode_segments(tiny_tokenizer, chatml_segments(
            [{"role": "system", "content": "Be precise."}, {"role": "user", "content": prompt},
             {"role": "assistant", "content": output}]))
        expected[tuple(ids)] = labels
    for row in train + rows_of(dm.val_dataset):
        assert expected[tuple(row["input_ids"])] == row["labels"]

    # Padding efficiency: grouping beats random batches, and the report matches the loader's real batches.
    assert dm.report.padding_efficiency_grouped > dm.report.padding_efficiency_random
    batches = list(dm.train_dataloader())
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert round(real / sum(b["attention_mask"].numel() for b in batches), 4) == dm.report.padding_efficiency_grouped
    batch = batches[0]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "source_index", "sample_id", "step_trained_tokens"}
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    # Without a Trainer an optimizer step is one batch: its total is the batch's own count of loss terms.
    for b in batches:
        assert b["step_trained_tokens"].tolist() == [int((b["labels"][:, 1:] != -100).sum())] * len(b["sample_id"])
    val_batches = list(dm.val_dataloader())
    assert sum(len(b["sample_id"]) for b in val_batches) == 5


def test_any_tokenizer_reference_autotokenizer_accepts(tmp_path, tiny_tokenizer, tiny_model_dir):
    """A tokenizer-only folder, a model folder and an object give the same prepared data; nothing needs a
    model config."""
    import pytest

    from finsight.data.tokenizer import TokenizerReferenceError

    tokenizer_only = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer_only)
    assert not (tokenizer_only / "config.json").exists()
    sources = [{"name": "qa", "path": "bundled:company_qa", "format": "qa"}]
    prepared = []
    for reference in (str(tokenizer_only), str(tiny_model_dir), tiny_tokenizer):
        dm = FinSightDataModule(sources=sources, tokenizer=reference, max_length=256,
                                cache_dir=str(tmp_path / "cache" / str(len(prepared))))
        dm.setup("fit")
        prepared.append((rows_of(dm.train_dataset), rows_of(dm.val_dataset)))
    assert prepared[0] == prepared[1] == prepared[2] and len(prepared[0][0]) > 100

    empty = tmp_path / "empty"
    empty.mkdir()
    for reference in (str(empty), "/no/such/tokenizer", "nobody/no-such-tokenizer", 42):
        with pytest.raises(TokenizerReferenceError) as exc_info:
            _ = FinSightDataModule(sources=sources, tokenizer=reference).tokenizer
        message = str(exc_info.value)
        assert "\n" not in message and repr(reference if isinstance(reference, str) else "int") in message
        assert "expected a Hub id (owner/name), a folder with tokenizer files" in message
