"""Data sources: what a source is, how its rows are read, and how each format becomes chat messages.

A source is ``{name, path, format, fraction}`` plus format options. Every format is one small class
with ``to_messages(row)``, which returns the conversation as ``[{role, content}, ...]`` or, for a row
that must be dropped, the reason as a string; nothing is dropped without a reason that the data report
counts. A source's ``columns`` maps the format's field names onto the file's own column names, so a file
is used as it is, never rewritten.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse.typing import restricted_number_type

from finsight.data import quality
from finsight.errors import FinSightError

log = logging.getLogger(__name__)

SourceFormat = Literal["reddit", "qa", "intro", "messages", "sharegpt", "alpaca"]
# A float in (0, 1]: the command line refuses 0, negative and > 1 while parsing the config, naming the key.
Fraction = restricted_number_type(
    "Fraction", float, [(">", 0.0), ("<=", 1.0)], join="and",
    docstring="a per-source subsample rate in (0, 1]",
)
SAMPLES_DIR = Path(__file__).parent / "samples"
BUNDLED_PREFIX = "bundled:"
# The identity chats an ``intro`` source reads when it names no file of its own.
INTRO_SAMPLE = BUNDLED_PREFIX + "intro"

BUNDLED_ASSISTANT_NAME = "FinSight"
"""The name the bundled identity chats give the assistant."""

DEFAULT_SYSTEM_PROMPT = (
    "You are FinSight, a finance assistant. You explain financial concepts, markets, personal finance and "
    "company filings clearly and accurately. You are not a licensed financial adviser and you cannot see "
    "live prices or anyone's accounts."
)


class DataSourceError(FinSightError, ValueError):
    """A source that cannot be used at all; the message names the source, the file and what was expected.

    Fix: correct what the message names: the file path, `format:` or the `columns:` mapping of that source
    ([Data](data.md)).
    """


@dataclass
class SourceConfig:
    """One data source of the training mixture.

    ``fraction`` is a per-source subsample rate: 0.67 keeps 67% of the rows of that source that pass the
    quality checks, drawn with the seed. It is not a target share of the final mixture: a large source at
    0.67 can still dominate a small one at 1.0. To aim at a share, set the fractions from the sizes in
    the data report.
    """

    name: str
    """Name used in the data report and for the per-source validation loss."""
    path: str | None = None
    """Hub dataset id, a .jsonl/.json/.csv/.parquet file, a folder, or ``bundled:<name>`` for a sample
    shipped with finsight. ``intro`` without a path reads the bundled identity chats (``bundled:intro``)."""
    format: SourceFormat = "messages"
    """How rows become conversations: reddit, qa, intro, messages, sharegpt or alpaca."""
    fraction: Fraction = 1.0
    """Share of the source's valid rows kept, in (0, 1] (0.67 keeps 67%)."""
    split: str = "train"
    """Split to read from a Hub dataset or folder."""
    min_score: float | None = 0.0
    """reddit: drop rows whose ``combined_score`` is below this (None disables the filter)."""
    context_in_system: bool = False
    """qa: put the filing excerpt (``context``) into the system prompt, so answers are grounded in it."""
    rows: int = 200
    """intro: how many identity conversations to use: the file's first rows (``bundled:intro`` holds 500)."""
    assistant_name: str | None = None
    """intro: the name the assistant gives itself in these chats, which ``finsight test`` checks its answers
    for. The bundled chats' is FinSight; a file of your own needs it."""
    columns: dict[str, str] | None = None
    """Your column names for the format's fields, ``{field: column}``, e.g. ``{question: Question, answer:
    Answer}`` for ``qa``. Fields: reddit title, selftext, body, combined_score; qa question, answer,
    context, ticker, filing; messages messages, role, content; sharegpt conversations, from, value; alpaca
    instruction, input, output (role/content and from/value name the keys inside each turn)."""
    min_answer_chars: int | None = None
    """Drop conversations whose shortest assistant turn has fewer characters than this. None: the
    format's default, 20 for reddit (one-word replies such as "lol"), 1 for the others (an answer of one
    word or one figure is a valid answer)."""
    max_chars: int = 20_000
    """Drop conversations longer than this in characters (pasted documents, spam)."""

    def __post_init__(self) -> None:
        if not isinstance(self.fraction, (int, float)) or not 0.0 < float(self.fraction) <= 1.0:
            raise DataSourceError(
                f"source {self.name!r}: fraction must be in (0, 1] (a per-source subsample rate), "
                f"got {self.fraction!r}"
            )
        if self.format not in FORMATS:
            raise DataSourceError(
                f"source {self.name!r}: unknown format {self.format!r}; known formats: {', '.join(FORMATS)}"
            )
        if self.format == "intro" and not self.path:
            self.path = INTRO_SAMPLE
        if self.format == "intro" and not self.assistant_name:
            if self.path != INTRO_SAMPLE:
                raise DataSourceError(f"source {self.name!r}: an intro source of your own needs assistant_name, the "
                                      "name its answers give the assistant (finsight test checks answers for it)")
            self.assistant_name = BUNDLED_ASSISTANT_NAME
        if self.assistant_name and self.format != "intro":
            raise DataSourceError(f"source {self.name!r}: assistant_name belongs to an intro (identity) source, "
                                  f"not to format {self.format!r}")
        if not self.path:
            raise DataSourceError(f"source {self.name!r}: format {self.format!r} needs a path")
        if self.format == "intro" and (not isinstance(self.rows, int) or self.rows < 1):
            raise DataSourceError(f"source {self.name!r}: rows must be a whole number of conversations, at least 1; "
                                  f"got {self.rows!r}")
        if self.columns:
            fields = FORMATS[self.format].fields
            unknown = [key for key in self.columns if key not in fields]
            if unknown or not all(isinstance(v, str) and v.strip() for v in self.columns.values()):
                what = (f"unknown field {', '.join(map(repr, unknown))}" if unknown
                        else "column names that are not text")
                raise DataSourceError(
                    f"source {self.name!r}: columns has {what}; format {self.format!r} reads "
                    f"{', '.join(fields) or 'no columns'} (write columns: {{field: your column name}})"
                )

    @property
    def answer_min_chars(self) -> int:
        """The shortest assistant answer kept: the source's own setting or its format's default."""
        return self.min_answer_chars if self.min_answer_chars is not None else FORMATS[self.format].min_answer_chars

    def thresholds(self) -> dict[str, Any]:
        """The drop thresholds in force for this source, as the data report names them."""
        limits: dict[str, Any] = {"min_answer_chars": self.answer_min_chars, "max_chars": self.max_chars}
        if self.format == "reddit":
            limits["min_score"] = self.min_score
        return limits

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for fingerprints and reports."""
        return asdict(self)


def trained_assistant_name(sources: list[SourceConfig]) -> str | None:
    """The name the mixture's identity (``intro``) source teaches the assistant; None for a mixture without one,
    which no identity check applies to."""
    return next((s.assistant_name for s in sources if s.format == "intro"), None)


def default_sources() -> list[SourceConfig]:
    """The methodology's mixture, with the real datasets on the Hub."""
    return [
        SourceConfig("reddit_finance", "winddude/reddit_finance_43_250k", "reddit", 0.67),
        SourceConfig("company_qa", "virattt/financial-qa-10K", "qa", 1.0),
        SourceConfig("intro", None, "intro", 1.0),
    ]


# ----------------------------------------------------------------------------------------------- formats


def _text(row: dict, key: str) -> str | None:
    """The field as a string, or None when it is missing or not text (the caller names the reason)."""
    value = row.get(key)
    return value if isinstance(value, str) else None


class RedditFormat:
    """``winddude/reddit_finance_43_250k``: the post (title + selftext) asks, the top comment answers."""

    columns = ("title", "selftext", "body")
    fields = ("title", "selftext", "body", "combined_score")
    # Reddit's one-word replies ("lol", "This.", "+1") are not answers; a real comment is longer.
    min_answer_chars = 20

    def __init__(self, source: SourceConfig, system_prompt: str):
        self.min_score = source.min_score

    def to_messages(self, row: dict) -> list[dict] | str:
        title, body = _text(row, "title"), _text(row, "body")
        selftext = row.get("selftext") or ""
        if title is None or body is None or not isinstance(selftext, str):
            return quality.MISSING_FIELD
        if not title.strip():
            return quality.EMPTY_TURN  # a Reddit post always has a title; an empty one is a broken row
        if body.strip() in quality.DELETED_MARKERS:
            return quality.DELETED
        if self.min_score is not None:
            score = row.get("combined_score")
            if isinstance(score, str):  # a CSV cell
                try:
                    score = float(score)
                except ValueError:
                    score = None
            if isinstance(score, (int, float)) and score < self.min_score:
                return quality.LOW_SCORE
        title, selftext, body = (quality.drop_edit_notes(text) for text in (title, selftext, body))
        question = title.strip() + ("\n\n" + selftext.strip() if selftext.strip() else "")
        return [{"role": "user", "content": question}, {"role": "assistant", "content": body.strip()}]


class QAFormat:
    """``virattt/financial-qa-10K``: a question and answer about a company's 10-K filing."""

    columns = ("question", "answer")
    fields = ("question", "answer", "context", "ticker", "filing")
    # Filing answers are often one figure or a short phrase ("$4.2 billion.").
    min_answer_chars = 1

    def __init__(self, source: SourceConfig, system_prompt: str):
        self.context_in_system = source.context_in_system
        self.system_prompt = system_prompt

    def to_messages(self, row: dict) -> list[dict] | str:
        question, answer = _text(row, "question"), _text(row, "answer")
        if question is None or answer is None:
            return quality.MISSING_FIELD
        if answer.strip() in quality.DELETED_MARKERS:
            return quality.DELETED
        messages = [{"role": "user", "content": question.strip()}, {"role": "assistant", "content": answer.strip()}]
        context = _text(row, "context")
        if self.context_in_system and context and context.strip():
            excerpt = f"Excerpt from the {row.get('ticker', '')} {row.get('filing', '')} filing:\n{context.strip()}"
            lead = self.system_prompt + "\n\n" if self.system_prompt else ""
            messages.insert(0, {"role": "system", "content": lead + excerpt})
        return messages


class MessagesFormat:
    """A ``messages`` column holding ``[{role, content}, ...]`` (the OpenAI / TRL conversational shape)."""

    columns = ("messages",)
    fields = ("messages", "role", "content")
    turn_fields = ("role", "content")
    min_answer_chars = 1
    key, role_key, content_key = "messages", "role", "content"
    role_names = {"system": "system", "user": "user", "assistant": "assistant"}

    def __init__(self, source: SourceConfig, system_prompt: str):
        # The keys inside each turn are renamed here; the column itself was renamed when the rows were read.
        mapping = source.columns or {}
        self.role_key = mapping.get(self.role_key, self.role_key).strip()
        self.content_key = mapping.get(self.content_key, self.content_key).strip()

    def to_messages(self, row: dict) -> list[dict] | str:
        turns = row.get(self.key)
        if not isinstance(turns, list):
            return quality.MISSING_FIELD
        messages = []
        for turn in turns:
            if not isinstance(turn, dict):
                return quality.MISSING_FIELD
            role = self.role_names.get(turn.get(self.role_key))
            content = turn.get(self.content_key)
            if role is None:
                return quality.BAD_ROLE_ORDER
            if not isinstance(content, str):
                return quality.MISSING_FIELD
            messages.append({"role": role, "content": content})
        return messages


class ShareGPTFormat(MessagesFormat):
    """ShareGPT: ``conversations`` of ``{from, value}`` with roles human/gpt/system."""

    columns = ("conversations",)
    fields = ("conversations", "from", "value")
    turn_fields = ("from", "value")
    key, role_key, content_key = "conversations", "from", "value"
    role_names = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class AlpacaFormat:
    """Alpaca: ``instruction``, optional ``input``, ``output``."""

    columns = ("instruction", "output")
    fields = ("instruction", "input", "output")
    min_answer_chars = 1

    def __init__(self, source: SourceConfig, system_prompt: str):
        pass

    def to_messages(self, row: dict) -> list[dict] | str:
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = row.get("input") or ""
        if instruction is None or output is None or not isinstance(extra, str):
            return quality.MISSING_FIELD
        prompt = instruction.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


class IntroFormat(MessagesFormat):
    """Identity chats (who FinSight is, what it can and cannot do) in the ``messages`` shape.

    A format of its own so a config says what the source is for and how many chats it takes (``rows``);
    the rows are read and checked exactly as ``messages`` rows are.
    """


FORMATS: dict[str, type] = {
    "reddit": RedditFormat,
    "qa": QAFormat,
    "intro": IntroFormat,
    "messages": MessagesFormat,
    "sharegpt": ShareGPTFormat,
    "alpaca": AlpacaFormat,
}


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class RawRows:
    """Rows read from a source, plus the lines that could not be read at all (counted, never silent)."""

    rows: list[dict]
    origin: str
    bad_lines: list[tuple[int, str]] = field(default_factory=list)


def resolve_path(path: str, source_name: str | None = None) -> str:
    """Map ``bundled:<name>`` onto the sample file shipped in the package."""
    if path.startswith(BUNDLED_PREFIX):
        name = path[len(BUNDLED_PREFIX) :]
        sample = SAMPLES_DIR / (name if name.endswith(".jsonl") else name + ".jsonl")
        if not sample.is_file():
            known = ", ".join(sorted(p.stem for p in SAMPLES_DIR.glob("*.jsonl")))
            where = f"source {source_name!r}: " if source_name else ""
            raise DataSourceError(f"{where}no bundled sample {name!r}; bundled samples: {known}")
        return str(sample)
    return path


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def read_source(source: SourceConfig, seed: int) -> RawRows:
    """Read a source's raw rows with ``datasets``; malformed files fall back to a line reader that counts."""
    path = resolve_path(source.path or "", source.name)
    local = Path(path).expanduser()
    # A Hub id is ``owner/name`` (or a bare name); anything else that is not on disk is a missing local path.
    looks_local = local.exists() or local.suffix in _BUILDERS or not _HUB_ID.fullmatch(path)
    if looks_local and not local.exists():
        kind = "file" if local.suffix else "path"
        raise DataSourceError(f"source {source.name!r}: {kind} {path!r} does not exist")
    if local.is_file():
        if local.suffix not in _BUILDERS:
            raise DataSourceError(
                f"source {source.name!r}: file {path!r} has an unknown type; expected one of "
                f"{', '.join(sorted(_BUILDERS))}"
            )
        if local.stat().st_size == 0:
            raise DataSourceError(f"source {source.name!r}: file {path!r} is empty")
    # pandas (under datasets' CSV reader) pads short rows with nulls without a word, so a CSV file is
    # checked for ragged or undecodable records first and read record by record when it has any.
    header = _clean_csv_header(local) if local.suffix == ".csv" else None
    rows = None if local.suffix == ".csv" and header is None else _read_with_datasets(source, path, local, header)
    if rows is None:
        rows = _read_lines(source, local)
    if not rows.rows and not rows.bad_lines:
        raise DataSourceError(f"source {source.name!r}: {path!r} has no rows")
    rows.rows = _normalized_keys(rows.rows)
    if source.columns:
        rows.rows = _mapped_columns(source, rows)
    if source.format == "intro":
        rows = _first_rows(source, rows)
    return rows


def _first_rows(source: SourceConfig, raw: RawRows) -> RawRows:
    """An ``intro`` source's first ``rows`` readable conversations; asking for more than the file holds is an
    error, not a quietly smaller source."""
    if source.rows > len(raw.rows):
        raise DataSourceError(f"source {source.name!r}: rows is {source.rows}, but {raw.origin!r} holds "
                              f"{len(raw.rows)} readable conversations; lower rows or give a path to a larger file")
    return RawRows(raw.rows[:source.rows], raw.origin, raw.bad_lines)


def _clean_key(key: Any) -> Any:
    """A header as a user reads it: without a byte-order mark or surrounding spaces."""
    return key.replace("\ufeff", "").strip() if isinstance(key, str) else key


def _normalized_keys(rows: list[dict]) -> list[dict]:
    """Rows whose column names carry a byte-order mark or surrounding spaces, renamed to the plain names."""
    keys = set().union(*(row.keys() for row in rows)) if rows else set()
    renamed = {key: _clean_key(key) for key in keys if _clean_key(key) != key}
    if not renamed:
        return rows
    return [{renamed.get(key, key): value for key, value in row.items()} for row in rows]


def _mapped_columns(source: SourceConfig, raw: RawRows) -> list[dict]:
    """Rows with the file's columns renamed to the format's fields, as ``source.columns`` maps them."""
    found = set().union(*(row.keys() for row in raw.rows)) if raw.rows else set()
    # Keys inside a turn (messages role/content, sharegpt from/value) are not columns of the file.
    inner = getattr(FORMATS[source.format], "turn_fields", ())
    renames = {_clean_key(column): field for field, column in source.columns.items() if field not in inner}
    absent = [f"{field}: {column}" for column, field in renames.items() if column not in found]
    if absent and raw.rows:
        raise DataSourceError(
            f"source {source.name!r} ({raw.origin}): columns maps {', '.join(absent)}, but the file has no such "
            f"column; found {', '.join(sorted(map(str, found))) or 'none'}"
        )
    replaced = set(renames) | set(renames.values())
    return [{**{key: value for key, value in row.items() if key not in replaced},
             **{field: row[column] for column, field in renames.items() if column in row}} for row in raw.rows]


_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_EXPECTED = {".json": "a JSON list of row objects (or use .jsonl: one object per line)",
             ".parquet": "a Parquet table with one row per example",
             ".jsonl": "one JSON object per line", ".csv": "a CSV file with a header row"}


def _read_with_datasets(source: SourceConfig, path: str, local: Path,
                        csv_header: list[str] | None = None) -> RawRows | None:
    """The rows as ``datasets`` reads them, or None for a JSON-lines/CSV file it cannot read as a whole."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    # datasets logs its own error before raising; the fallback below says what happens instead.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if local.is_file():
            # A CSV cell is text, as the record reader gives it: an answer "4.20" stays "4.20" (not the float
            # 4.2, which the format would drop as non-text), and "NA" or an empty cell is not turned into None.
            options = {}
            if csv_header is not None:
                options = {"keep_default_na": False,
                           "features": datasets.Features({name: datasets.Value("string") for name in csv_header})}
            ds = datasets.load_dataset(_BUILDERS[local.suffix], data_files=str(local), split="train", **options)
        else:
            ds = datasets.load_dataset(path, split=source.split)
        if isinstance(ds, datasets.DatasetDict):  # a folder without the split asked for
            raise DataSourceError(f"source {source.name!r}: {path!r} has no split {source.split!r}")
        # Arrow accepts invalid UTF-8 in JSON strings and fails only here, so this belongs inside the try.
        return RawRows(ds.to_list(), path)
    except DataSourceError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types for malformed files
        if local.is_file() and local.suffix in (".jsonl", ".csv"):
            log.warning("source %r: %s could not be read as a whole (%s); reading it line by line",
                        source.name, local.name, type(err).__name__)
            return None
        if local.is_file():
            where, expected = "file", _EXPECTED.get(local.suffix, "")
        elif local.is_dir():
            where, expected = "folder", f"data files ({', '.join(sorted(_BUILDERS))}) for split {source.split!r}"
        else:
            where, expected = "Hub dataset", ("an existing local path, or a Hub dataset id (owner/name) in the "
                                              "local cache or reachable online")
        raise DataSourceError(
            f"source {source.name!r}: could not read {where} {path!r} ({_one_line(err)}); expected {expected}"
        ) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _one_line(err: BaseException) -> str:
    """The most specific message of an error chain, on one line (datasets wraps the parser's error)."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    text = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {text[-1]}" if text else type(err).__name__


def _clean_csv_header(local: Path) -> list[str] | None:
    """The header of a CSV file whose every record decodes as UTF-8 and has as many fields as the header,
    else None (such a file is read record by record)."""
    try:
        text = local.read_bytes().decode("utf-8")
        reader = csv.reader(text.splitlines(keepends=True))
        header = next(reader, [])
        if not all(len(record) == len(header) for record in reader if record):
            return None
    except (UnicodeDecodeError, csv.Error):
        return None
    return [name.replace("\ufeff", "", 1) if i == 0 else name for i, name in enumerate(header)]


_SURROGATE = re.compile("[\udc80-\udcff]")


def _read_lines(source: SourceConfig, local: Path) -> RawRows:
    """Read a JSON-lines or CSV file row by row, so one bad line costs one counted row, not the file.

    Line numbers are those of the file (1-based; for CSV, the line where the record starts), so a user can
    open the file at the reported line.
    """
    rows: list[dict] = []
    bad: list[tuple[int, str]] = []
    data = local.read_bytes()
    if local.suffix == ".jsonl":
        for number, line in enumerate(data.split(b"\n"), start=1):
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not part of the first row
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad.append((number, quality.UNDECODABLE))
                continue
            except json.JSONDecodeError:
                bad.append((number, quality.BAD_JSON))
                continue
            if not isinstance(value, dict):
                bad.append((number, quality.BAD_JSON))
                continue
            rows.append(value)
        return RawRows(rows, str(local), bad)
    # Undecodable bytes survive decoding as lone surrogates, so the record holding them can be named.
    reader = csv.reader(line.decode("utf-8", "surrogateescape") for line in data.splitlines(keepends=True))
    header = next(reader, None) or []
    while True:
        number = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error:  # e.g. a NUL byte or an unterminated quote
            bad.append((number, quality.RAGGED_ROW))
            continue
        if not record or record == [""]:
            continue
        if any(_SURROGATE.search(value) for value in record):
            bad.append((number, quality.UNDECODABLE))
        elif len(record) < len(header) or any(value.strip() for value in record[len(header):]):
            bad.append((number, quality.RAGGED_ROW))
        else:  # trailing empty fields (a spreadsheet's trailing commas) hold nothing to lose
            rows.append(dict(zip(header, record)))
    return RawRows(rows, str(local), bad)


def check_columns(source: SourceConfig, raw: RawRows) -> None:
    """Refuse a source whose rows lack the columns its format needs, naming the found columns and the
    ``columns`` mapping that would fix it."""
    needed = FORMATS[source.format].columns
    if not needed or not raw.rows:
        return
    found = set().union(*(row.keys() for row in raw.rows[:100]))
    missing = [c for c in needed if c not in found]
    if missing:
        raise DataSourceError(
            f"source {source.name!r} ({raw.origin}): format {source.format!r} needs columns "
            f"{', '.join(needed)}; missing {', '.join(missing)}; found {', '.join(sorted(map(str, found))) or 'none'}"
            f"; map yours in the source with {_suggested_mapping(missing, found)}"
        )


def _suggested_mapping(missing: list[str], found: set) -> str:
    """``columns: {field: column}`` for the missing fields, with the found column that looks like each."""
    names = {str(column).casefold(): str(column) for column in found}
    pairs = []
    for name in missing:
        close = difflib.get_close_matches(name.casefold(), list(names), n=1, cutoff=0.6)
        pairs.append(f"{name}: {names[close[0]] if close else '<your column>'}")
    return "columns: {" + ", ".join(pairs) + "}"


def conversations(
    source: SourceConfig, raw: RawRows, system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> tuple[list[list[dict]], dict[str, int]]:
    """Turn raw rows into clean, valid conversations, counting every drop by reason.

    Text is cleaned (``quality.clean_text``) before the checks, so a check judges what the model will see.
    Exact duplicates are keyed on the conversation as the model sees it (system prompt included), not on
    columns the template never renders.
    """
    converter = FORMATS[source.format](source, system_prompt)
    min_answer_chars = source.answer_min_chars
    dropped: dict[str, int] = {}
    for _, reason in raw.bad_lines:
        dropped[reason] = dropped.get(reason, 0) + 1
    kept: list[list[dict]] = []
    seen: set[tuple] = set()
    for row in raw.rows:
        result = converter.to_messages(row)
        if isinstance(result, list):
            result = [{"role": m["role"], "content": quality.clean_text(m["content"])} for m in result]
            result = quality.with_system_prompt(result, system_prompt)
            result = quality.check_conversation(result, min_answer_chars, source.max_chars)
        if isinstance(result, str):
            dropped[result] = dropped.get(result, 0) + 1
            continue
        key = tuple((m["role"], m["content"]) for m in result)  # tuples of strings hash fast
        if key in seen:
            dropped[quality.DUPLICATE] = dropped.get(quality.DUPLICATE, 0) + 1
            continue
        seen.add(key)
        kept.append(result)
    return kept, dropped
