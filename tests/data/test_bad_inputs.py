"""Bad input: each case either drops exactly its bad rows (counted, with line numbers where a line could not
be read, in the data report; every good row of the same file kept) or stops with a one-line error that names
the file, row or key and says what was expected. The corpus is in ``tests/data/bad_inputs/``.

| #  | case                               | input                                                  | outcome |
|----|------------------------------------|--------------------------------------------------------|---------|
| 1  | missing file                       | ``nope.jsonl``                                         | error: file '…nope.jsonl' does not exist |
| 2  | missing folder                     | ``nope_dir/``                                          | error: path '…nope_dir/' does not exist |
| 3  | empty file                         | ``empty.jsonl`` (0 bytes)                              | error: file '…empty.jsonl' is empty |
| 4  | file of blank lines                | ``blank_lines.jsonl``                                  | error: '…blank_lines.jsonl' has no rows |
| 5  | folder without data files          | an empty folder                                        | error: could not read folder …; expected data files … |
| 6  | unknown file type                  | ``notes.txt``                                          | error: unknown type; expected one of .csv, .json, … |
| 7  | malformed JSON file                | ``broken.json``                                        | error: could not read file …; expected a JSON list … |
| 8  | columns the format needs missing   | ``missing_columns.jsonl`` as ``qa``                    | error naming the file, needed, missing and found columns |
| 9  | wrong column types                 | ``wrong_types.jsonl``: ``body`` a number in 2 rows     | missing_or_non_text_field=2; 5 good rows kept |
| 10 | malformed JSON lines               | ``malformed_lines.jsonl``: lines 3, 5, 6               | malformed_json_line=3, lines [3, 5, 6]; 6 kept |
| 11 | undecodable bytes (JSON lines)     | ``undecodable.jsonl``: line 3                          | undecodable_bytes=1, line [3]; 4 kept |
| 12 | undecodable bytes (CSV)            | ``undecodable.csv``: line 4                            | undecodable_bytes=1, line [4]; 4 kept |
| 13 | ragged CSV rows                    | ``ragged.csv``: one long (3), one short (5) record     | ragged_csv_row=2, lines [3, 5]; 4 kept (one spans 2 lines) |
| 14 | empty, whitespace, enormous texts  | ``texts.jsonl``                                        | empty_turn=2, too_long=1; 3 kept |
| 15 | bad role order, no assistant turn  | ``roles.jsonl``                                        | bad_role_order=3; 2 kept |
| 16 | duplicate rows                     | ``duplicates.jsonl``                                   | duplicate=3; 3 kept |
| 17 | source emptied by its filters      | ``all_deleted.jsonl``                                  | error naming the source and deleted_or_removed=3 |
| 18 | fraction 0                         | ``SourceConfig(fraction=0)`` and the CLI               | refused when the config is parsed |
| 19 | fraction negative                  | ``-0.2``                                               | refused when the config is parsed |
| 20 | fraction above 1                   | ``1.5``                                                | refused when the config is parsed |
| 21 | unknown format                     | ``format: tweets``                                     | error listing the known formats |
| 22 | unknown config keys                | ``fracton:`` in a source, ``data.max_lenght``           | CLI exits naming the key |
| 23 | wrong value types                  | ``data.batch_size: four``                              | CLI exits naming the key and the expected type |
| 24 | model path that does not exist     | ``resolve_model('/no/such/model')``                    | ModelReferenceError naming it |
| 25 | tokenizer without a chat template  | a tokenizer object with ``chat_template = None``       | ChatTemplateError: has no chat template |
| 26 | max_length smaller than the prompt | ``long_prompts.jsonl`` at ``max_length=40``            | error naming the source and its no_trained_tokens count |
| 27 | bundled sample that does not exist | ``bundled:nope``                                       | error listing the bundled samples |
| 28 | Hub dataset not reachable          | ``someone/not-a-dataset`` offline                      | error naming it; expected a Hub id in the cache or online |
| 29 | two sources with one name          | ``[a, a]``                                             | error: source names must be unique |
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from finsight import FinSightDataModule
from finsight.data.chat import ChatTemplateError
from finsight.data.sources import DataSourceError, SourceConfig
from finsight.references import ModelReferenceError, resolve_model

CORPUS = Path(__file__).parent / "bad_inputs"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def prepare(tokenizer, tmp_path: Path, sources: list[dict], **kwargs) -> FinSightDataModule:
    dm = FinSightDataModule(sources=sources, tokenizer=tokenizer, val_fraction=0.0,
                            cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


# (case, file, format, dropped by reason, bad line numbers, good rows kept)
ROW_CASES = [
    ("wrong_column_types", "wrong_types.jsonl", "reddit", {"missing_or_non_text_field": 2}, [], 5),
    ("malformed_json_lines", "malformed_lines.jsonl", "qa", {"malformed_json_line": 3}, [3, 5, 6], 6),
    ("undecodable_jsonl", "undecodable.jsonl", "qa", {"undecodable_bytes": 1}, [3], 4),
    ("undecodable_csv", "undecodable.csv", "alpaca", {"undecodable_bytes": 1}, [4], 4),
    ("ragged_csv", "ragged.csv", "alpaca", {"ragged_csv_row": 2}, [3, 5], 4),
    ("empty_whitespace_enormous_texts", "texts.jsonl", "messages", {"empty_turn": 2, "too_long": 1}, [], 3),
    ("bad_role_order_no_assistant", "roles.jsonl", "messages", {"bad_role_order": 3}, [], 2),
    ("duplicate_rows", "duplicates.jsonl", "qa", {"duplicate": 3}, [], 3),
]


@pytest.mark.parametrize(("case", "file", "fmt", "dropped", "bad_lines", "kept"), ROW_CASES,
                         ids=[c[0] for c in ROW_CASES])
def test_bad_rows_are_dropped_counted_and_reported(tiny_tokenizer, tmp_path, case, file, fmt, dropped,
                                                   bad_lines, kept):
    dm = prepare(tiny_tokenizer, tmp_path, [{"name": case, "path": str(CORPUS / file), "format": fmt}])
    report = dm.report.source(case)
    assert report.dropped == dropped
    assert report.bad_lines == bad_lines
    assert report.valid == report.train == kept == len(dm.train_dataset)
    assert report.rows_read == kept + sum(dropped.values())
    saved = dm.report.to_dict()["sources"][0]
    assert saved["dropped"] == dropped and saved["bad_lines"] == bad_lines  # in the JSON report too
    if bad_lines:  # and in the printed table, so a user can open the file at those lines
        from rich.console import Console

        console = Console(width=250, record=True)
        console.print(dm.report.table().rich())
        assert "unreadable lines " + ", ".join(map(str, bad_lines)) in console.export_text()


def one_line_error(exc_info, *names: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, (name, message)
    return message


# (case, path relative to the corpus or absolute, format, extra DataModule settings, words the error must hold)
ERROR_CASES = [
    ("missing_file", "nope.jsonl", "qa", {}, ["nope.jsonl", "does not exist"]),
    ("missing_folder", "nope_dir/", "qa", {}, ["nope_dir", "does not exist"]),
    ("empty_file", "empty.jsonl", "qa", {}, ["empty.jsonl", "is empty"]),
    ("blank_lines", "blank_lines.jsonl", "qa", {}, ["blank_lines.jsonl", "has no rows"]),
    ("unknown_file_type", "notes.txt", "qa", {}, ["notes.txt", "unknown type", "expected one of .csv, .json"]),
    ("malformed_json_file", "broken.json", "qa", {}, ["broken.json", "expected a JSON list of row objects"]),
    ("missing_columns", "missing_columns.jsonl", "qa", {},
     ["missing_columns.jsonl", "needs columns question, answer", "missing question, answer", "found a, q"]),
    ("emptied_by_filters", "all_deleted.jsonl", "reddit", {},
     ["'emptied_by_filters'", "all_deleted.jsonl", "no rows left", "read 3", "deleted_or_removed=3"]),
    ("prompt_longer_than_max_length", "long_prompts.jsonl", "qa", {"max_length": 40},
     ["'prompt_longer_than_max_length'", "no_trained_tokens_after_truncation=3", "max_length=40",
      "raise max_length"]),
    ("unknown_bundled_sample", "bundled:nope", "qa", {}, ["'nope'", "bundled samples: company_qa, intro, reddit_finance"]),
    ("unreachable_hub_dataset", "someone/not-a-dataset", "qa", {},
     ["'someone/not-a-dataset'", "or a Hub dataset id (owner/name)"]),
]


@pytest.mark.parametrize(("case", "path", "fmt", "settings", "words"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_unusable_sources_stop_with_one_line(tiny_tokenizer, tmp_path, case, path, fmt, settings, words):
    if not path.startswith("bundled:") and path != "someone/not-a-dataset":
        path = str(CORPUS / path) + ("/" if path.endswith("/") else "")
    with pytest.raises(DataSourceError) as exc_info:
        prepare(tiny_tokenizer, tmp_path, [{"name": case, "path": path, "format": fmt}], **settings)
    message = one_line_error(exc_info, *words)
    assert f"'{case}'" in message  # the source is named too


def test_folder_without_data_files(tiny_tokenizer, tmp_path):
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    with pytest.raises(DataSourceError) as exc_info:
        prepare(tiny_tokenizer, tmp_path, [{"name": "folder", "path": str(folder), "format": "qa"}])
    one_line_error(exc_info, str(folder), "expected data files")


@pytest.mark.parametrize("fraction", [0, -0.2, 1.5])
def test_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(DataSourceError) as exc_info:
        SourceConfig("reddit", "bundled:reddit_finance", "reddit", fraction)
    one_line_error(exc_info, "'reddit'", "fraction must be in (0, 1]", repr(fraction))
    with pytest.raises(DataSourceError):  # also when the data module gets plain dicts
        FinSightDataModule(sources=[{"name": "r", "path": "bundled:reddit_finance", "format": "reddit",
                                     "fraction": fraction}])


def test_unknown_format_and_duplicate_names_are_refused():
    with pytest.raises(DataSourceError) as exc_info:
        SourceConfig("tweets", "x.jsonl", "tweets")
    one_line_error(exc_info, "'tweets'", "known formats: reddit, qa, intro, messages, sharegpt, alpaca")
    with pytest.raises(DataSourceError) as exc_info:
        FinSightDataModule(sources=[{"name": "a", "path": "bundled:company_qa", "format": "qa"}] * 2)
    one_line_error(exc_info, "source names must be unique", "'a'")


def test_model_path_that_does_not_exist():
    for reference, words in (("/no/such/model", ["'/no/such/model'", "neither an existing folder"]),
                             ("/no/such/model.gguf", ["'/no/such/model.gguf'", "does not exist"])):
        with pytest.raises(ModelReferenceError) as exc_info:
            resolve_model(reference)
        one_line_error(exc_info, *words)


def test_tokenizer_without_chat_template(tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError) as exc_info:
        prepare(tokenizer, tmp_path, [{"name": "qa", "path": "bundled:company_qa", "format": "qa"}])
    one_line_error(exc_info, "has no chat template", "set tokenizer.chat_template")


def quickstart_with(tmp_path: Path, change) -> Path:
    config = yaml.safe_load(QUICKSTART.read_text())
    change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def set_in(*keys_and_value):
    *keys, value = keys_and_value

    def change(config: dict) -> None:
        node = config
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


# (case, change to the quickstart config, patterns the CLI's error must match)
CLI_CASES = [
    ("fraction_zero", set_in("data", "sources", 0, "fraction", 0),
     [r'"fraction"', r"0 does not conform to restriction v>0.0 and v<=1.0"]),
    ("fraction_negative", set_in("data", "sources", 0, "fraction", -0.2), [r'"fraction"', r"-0.2 does not conform"]),
    ("fraction_above_one", set_in("data", "sources", 0, "fraction", 1.5), [r'"fraction"', r"1.5 does not conform"]),
    ("unknown_source_key", set_in("data", "sources", 0, "fracton", 0.5), [r"'fracton' is not accepted"]),
    ("unknown_data_key", set_in("data", "max_lenght", 5), [r"does not accept option 'max_lenght'"]),
    ("wrong_value_type", set_in("data", "batch_size", "four"),
     [r'"data.batch_size"', r"Expected a <class 'int'>. Got value: four"]),
    ("unknown_format", set_in("data", "sources", 0, "format", "tweets"),
     [r'"format"', r"Literal\['reddit', 'qa', 'intro', 'messages', 'sharegpt', 'alpaca'\]. Got value: tweets"]),
]


@pytest.mark.parametrize(("case", "change", "patterns"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_config_when_parsing(tmp_path, capsys, case, change, patterns):
    from finsight.cli.lightning_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(quickstart_with(tmp_path, change)), "--print_config"])
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert not captured.out  # nothing printed as if the config were fine
    for pattern in patterns:
        assert re.search(pattern, captured.err), (pattern, captured.err[-2000:])


def test_every_user_error_shares_one_base_caught_once_by_the_entry(monkeypatch, capsys):
    import importlib
    import inspect
    import pkgutil

    import finsight
    from finsight.__main__ import entry
    from finsight.cli import lightning_cli
    from finsight.errors import FinSightError

    error_classes = []
    for info in pkgutil.walk_packages(finsight.__path__, "finsight."):
        if info.name.endswith("__main__"):  # running it would start the CLI
            continue
        module = importlib.import_module(info.name)
        error_classes += [obj for name, obj in vars(module).items() if inspect.isclass(obj)
                          and issubclass(obj, Exception) and obj.__module__ == info.name]
    names = sorted(cls.__name__ for cls in error_classes)
    assert {"EvalSetError", "CheckpointContentError", "GGUFExportError", "TokenizerReferenceError"} <= set(names)
    assert [cls.__name__ for cls in error_classes if not issubclass(cls, FinSightError)] == []

    def raise_eval_set_error() -> None:
        from finsight.evaluation.metrics import EvalSetError
        raise EvalSetError("eval file 'x.jsonl' row 3: expected a 'messages' list")

    monkeypatch.setattr(lightning_cli, "main", raise_eval_set_error)
    assert entry() == 1
    assert capsys.readouterr().err == "error: eval file 'x.jsonl' row 3: expected a 'messages' list\n"
