"""Files as users bring them (``tests/data/real_world/``): column mapping, per-format thresholds and text cleaning.

Every row of the corpus is listed here with its outcome: the answer as the model will see it, or the
reason it is dropped. Nothing else may happen to a row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import chatml_segments, encode_segments, rows_of, write_csv

from finsight import FinSightDataModule
from finsight.data import quality
from finsight.data.sources import (
    DEFAULT_SYSTEM_PROMPT,
    DataSourceError,
    SourceConfig,
    check_columns,
    conversations,
    read_source,
)

CORPUS = Path(__file__).resolve().parent / "real_world"
QA_COLUMNS = {"question": "Question", "answer": "Answer"}
CHAT_COLUMNS = {"messages": "dialog", "role": "speaker", "content": "text"}

REASONS = {quality.DELETED, quality.EMPTY_TURN, quality.DUPLICATE, quality.TOO_SHORT, quality.LOW_SCORE}

# filing_qa.csv, in file order: the answer kept (cleaned) or the drop reason.
FILING_QA = [
    "$4.2 billion.", "It is 3 dollars.", "Yes", "3", "14%", "1.2 million sq ft", "€1,3 Mrd.",
    "Ernst & Young LLP",
    "On the SEC site: https://www.sec.gov/cgi-bin/browse-edgar?company=acme&type=10-K&notify=1",
    "4,2 Milliarden Dollar.", "42億ドルです。", "Up 12% 📈",
    "**Competition**, *supply chain* disruption and\n- interest rates\n- currency moves",
    quality.DELETED, quality.EMPTY_TURN, quality.EMPTY_TURN, quality.DUPLICATE,
]
REDDIT = [
    "Yes. At 22 your tax rate is probably low, so paying tax now & growing tax-free is a good trade.\n\n"
    "> but what about the 401k match?\n\nTake the match first, then the Roth.",
    "Start with Item 7 (MD&A) and the cash-flow statement. The SEC has a guide: "
    "https://www.sec.gov/oiea/investor-alerts-and-bulletins/how-read-10-k",
    "**Math first:** if the loan is at 7% and your savings earn 4%, paying it off wins.\n\n"
    "* pay extra principal\n* keep an emergency fund",
    "The yearly fee a fund takes, as a share of your money: 0.03% of $10,000 is $3 a year. 💸",
    "Sí, para la mayoría: comisiones bajas y diversificación amplia, a largo plazo.",
    quality.TOO_SHORT,  # "lol"
    quality.TOO_SHORT,  # "This."
    quality.DELETED, quality.DELETED,
    quality.EMPTY_TURN,  # only an edit note
    quality.LOW_SCORE,
    "Bonds that mature in different years, so some cash comes due every year and rates are averaged.",
]
CHATS = [
    ["No."],
    ["| portfolio | yearly withdrawal |\n|---|---|\n| $500,000 | $20,000 |\n| $1,000,000 | $40,000 |"],
    ["Up.", "Down"], ["复利"], ["```python\nprint(1.05 ** 10)  # 1.6288946267774416\n```"], ["👍"],
    quality.EMPTY_TURN, quality.DUPLICATE,
]


def outcomes(name: str, fmt: str, columns: dict | None) -> tuple[list, dict, list[list[dict]]]:
    source = SourceConfig(name, str(CORPUS / name), fmt, columns=columns)
    raw = read_source(source, seed=0)
    check_columns(source, raw)
    kept, dropped = conversations(source, raw)
    return [[m["content"] for m in k if m["role"] == "assistant"] for k in kept], dropped, kept


@pytest.mark.parametrize(("name", "fmt", "columns", "expected"), [
    ("filing_qa.csv", "qa", QA_COLUMNS, FILING_QA),
    ("reddit.jsonl", "reddit", None, REDDIT),
    ("chats.jsonl", "messages", CHAT_COLUMNS, CHATS),
], ids=["filing_qa", "reddit", "chats"])
def test_every_row_is_kept_cleaned_or_dropped_with_its_reason(name, fmt, columns, expected):
    answers, dropped, _ = outcomes(name, fmt, columns)
    kept = [e if isinstance(e, list) else [e] for e in expected if not (isinstance(e, str) and e in REASONS)]
    reasons: dict[str, int] = {}
    for e in expected:
        if isinstance(e, str) and e in REASONS:
            reasons[e] = reasons.get(e, 0) + 1
    assert answers == kept
    assert dropped == reasons


def test_reddit_questions_lose_their_edit_notes_and_chats_keep_their_own_system_prompt():
    _, _, kept = outcomes("reddit.jsonl", "reddit", None)
    assert kept[-1][1]["content"] == "What is a bond ladder?\n\nI keep hearing this term."
    _, _, kept = outcomes("chats.jsonl", "messages", CHAT_COLUMNS)
    assert kept[2][0] == {"role": "system", "content": "Answer in one word."}
    assert kept[0][0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}


def test_thresholds_are_per_format_and_can_be_set():
    assert SourceConfig("r", "x.jsonl", "reddit").thresholds() == {"min_answer_chars": 20, "max_chars": 20_000,
                                                                    "min_score": 0.0}
    for fmt in ("qa", "messages", "sharegpt", "alpaca"):
        assert SourceConfig("s", "x.jsonl", fmt).thresholds() == {"min_answer_chars": 1, "max_chars": 20_000}
    source = SourceConfig("qa", str(CORPUS / "filing_qa.csv"), "qa", columns=QA_COLUMNS, min_answer_chars=4)
    _, dropped = conversations(source, read_source(source, 0))
    assert dropped[quality.TOO_SHORT] == 3  # "Yes", "3", "14%"


def test_missing_columns_error_suggests_the_mapping():
    source = SourceConfig("filings", str(CORPUS / "filing_qa.csv"), "qa")
    with pytest.raises(DataSourceError) as exc_info:
        check_columns(source, read_source(source, 0))
    message = str(exc_info.value)
    assert "\n" not in message
    # The byte-order mark and the spaces around the header names are gone from the found names.
    assert "found Answer, Company, Question;" in message
    assert message.endswith("map yours in the source with columns: {question: Question, answer: Answer}")


def test_a_mapping_to_a_column_the_file_lacks_or_to_an_unknown_field_is_refused():
    with pytest.raises(DataSourceError, match=r"columns maps answer: Reply, but the file has no such column; "
                                              r"found Answer, Company, Question"):
        read_source(SourceConfig("f", str(CORPUS / "filing_qa.csv"), "qa",
                                 columns={"question": "Question", "answer": "Reply"}), 0)
    with pytest.raises(DataSourceError, match=r"unknown field 'reply'; format 'qa' reads question, answer, "
                                              r"context, ticker, filing"):
        SourceConfig("f", "x.csv", "qa", columns={"reply": "Answer"})


@pytest.mark.parametrize(("fmt", "header", "row", "columns", "answer"), [
    ("reddit", ["Post", "Text", "Top comment", "Score"],
     ["Index funds?", "", "Yes, a broad index fund is a fine core holding.", "0.5"],
     {"title": "Post", "selftext": "Text", "body": "Top comment", "combined_score": "Score"},
     "Yes, a broad index fund is a fine core holding."),
    ("qa", ["q", "a", "excerpt"], ["Revenue?", "$4.2B", "Revenue was $4.2B."],
     {"question": "q", "answer": "a", "context": "excerpt"}, "$4.2B"),
    ("alpaca", ["prompt", "extra", "completion"], ["Define APR.", "", "Yearly rate"],
     {"instruction": "prompt", "input": "extra", "output": "completion"}, "Yearly rate"),
], ids=["reddit", "qa", "alpaca"])
def test_every_csv_format_maps_its_columns(tmp_path, fmt, header, row, columns, answer):
    path = write_csv(tmp_path / "data.csv", header, [row])
    source = SourceConfig("mine", str(path), fmt, columns=columns)
    raw = read_source(source, 0)
    check_columns(source, raw)
    kept, dropped = conversations(source, raw)
    assert dropped == {} and kept[0][-1] == {"role": "assistant", "content": answer}


def test_sharegpt_maps_its_column_and_turn_keys(tmp_path):
    path = tmp_path / "sg.jsonl"
    path.write_text('{"thread": [{"who": "human", "said": "APR?"}, {"who": "gpt", "said": "A yearly rate."}]}\n')
    source = SourceConfig("sg", str(path), "sharegpt", columns={"conversations": "thread", "from": "who",
                                                                 "value": "said"})
    kept, dropped = conversations(source, read_source(source, 0))
    assert dropped == {} and kept[0][1:] == [{"role": "user", "content": "APR?"},
                                             {"role": "assistant", "content": "A yearly rate."}]


def test_short_answers_of_a_csv_train_with_a_correct_mask(tiny_tokenizer, tmp_path):
    """An outside user's CSV: other column names, figures for answers; every valid row kept and trained."""
    dm = FinSightDataModule(
        sources=[{"name": "filings", "path": str(CORPUS / "filing_qa.csv"), "format": "qa", "columns": QA_COLUMNS}],
        tokenizer=tiny_tokenizer, val_fraction=0.0, max_length=256, cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    report = dm.report.source("filings")
    assert (report.rows_read, report.valid, report.train) == (17, 13, 13)
    assert report.thresholds["min_answer_chars"] == 1
    expected = {}
    _, _, kept = outcomes("filing_qa.csv", "qa", QA_COLUMNS)
    for messages in kept:
        ids, labels = encode_segments(tiny_tokenizer, chatml_segments(messages))
        expected[tuple(ids)] = labels
    rows = rows_of(dm.train_dataset)
    assert len(rows) == 13
    for row in rows:
        assert expected[tuple(row["input_ids"])] == row["labels"]


def test_column_mapping_from_yaml_and_the_command_line(tmp_path, tiny_model_dir):
    import json

    import yaml

    from finsight.cli.lightning_cli import main

    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    source = {"name": "filings", "path": str(CORPUS / "filing_qa.csv"), "format": "qa", "columns": QA_COLUMNS}
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"sources": [source]}}))
    for given in (["--config", str(config)], [f"--data.sources={json.dumps([source])}"]):
        cli = main(["--config", str(quickstart), *given, f"--model.model_name={tiny_model_dir}",
                    "--data.val_fraction=0.0", f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.logger=false"],
                   run=False)
        assert cli.datamodule.sources[0].columns == QA_COLUMNS
        cli.datamodule.setup("fit")
        assert (cli.datamodule.report.source("filings").valid, len(cli.datamodule.train_dataset)) == (13, 13)


def test_trailing_empty_fields_of_a_spreadsheet_export_are_not_ragged(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("Question,Answer\nRevenue?,$4.2B,,\nMargin?,12%\nBroken?,yes,extra\n", encoding="utf-8")
    source = SourceConfig("export", str(path), "qa", columns=QA_COLUMNS)
    raw = read_source(source, 0)
    kept, dropped = conversations(source, raw)
    assert [k[-1]["content"] for k in kept] == ["$4.2B", "12%"]
    assert dropped == {quality.RAGGED_ROW: 1} and raw.bad_lines == [(4, quality.RAGGED_ROW)]
