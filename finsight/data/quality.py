"""Row checks and drop accounting: every row that does not reach training is counted by its reason.

The :class:`DataReport` is what a user reads to trust the data: rows read, dropped by reason, kept after
``fraction``, train and validation sizes, token counts and lengths per source, and the padding efficiency
of the batches. It is printed as a Rich table, saved as JSON beside the run's logs and logged to
TensorBoard.
"""

from __future__ import annotations

import html
import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from finsight.tables import TextTable

# Drop reasons, as they appear in the report.
MISSING_FIELD = "missing_or_non_text_field"
EMPTY_TURN = "empty_turn"
DELETED = "deleted_or_removed"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
BAD_ROLE_ORDER = "bad_role_order"
DUPLICATE = "duplicate"
LOW_SCORE = "low_score"
BAD_JSON = "malformed_json_line"
UNDECODABLE = "undecodable_bytes"
RAGGED_ROW = "ragged_csv_row"
NO_TRAINED_TOKENS = "no_trained_tokens_after_truncation"

DELETED_MARKERS = frozenset({"[deleted]", "[removed]", "[deleted by user]"})

# Invisible characters that carry no text: zero-width space/joiners, word joiner, byte-order mark, soft hyphen.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_BLANK_RUN = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
# A line that opens a Reddit edit note: "EDIT:", "Edit 2:", "**Edit:**", "ETA:", "edit -".
_EDIT_NOTE = re.compile(r"^[ \t>*_]*(?:edit(?:ed)?|eta)\b[ \t]*\d*[ \t*_]*(?::|-(?=\s))[^\n]*(?:\n|$)",
                        re.IGNORECASE | re.MULTILINE)


def clean_text(text: str) -> str:
    """Text as a chat model should see it, for every format: HTML entities decoded (``&amp;`` → ``&``),
    invisible characters removed, non-breaking spaces made spaces, line ends unified, runs of blank lines
    cut to one, surrounding whitespace stripped. Markdown, URLs, emoji and every language are kept."""
    if "&" in text:
        # Only complete entities (with their ";"): a URL's "&notify=1" is not the legacy entity "&not".
        text = _ENTITY.sub(lambda match: html.unescape(match.group()), text)
    text = _INVISIBLE.sub("", text).replace("\u00a0", " ")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _BLANK_RUN.sub("\n\n", text).strip()


def drop_edit_notes(text: str) -> str:
    """A Reddit text without its edit notes: lines that start with ``EDIT:``/``Edit 2:``/``ETA:`` talk to
    the thread (thanks, votes, replies to commenters), not to the person asking."""
    return _EDIT_NOTE.sub("", text) if text else text


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """Give a conversation the run's system prompt unless it brings its own (an empty prompt gives none)."""
    if not system_prompt or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def check_conversation(messages: list[dict], min_answer_chars: int, max_chars: int) -> list[dict] | str:
    """Return the conversation if it is fit to train on, else the reason to drop it.

    Valid: an optional system message, then user and assistant turns alternating, starting with the user
    and ending with the assistant; no empty turn; no deleted marker; assistant turns not one-word replies;
    the whole not absurdly long.
    """
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns or len(turns) % 2:
        return BAD_ROLE_ORDER
    total = 0
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            return BAD_ROLE_ORDER
        content = turn["content"]
        if not content.strip():
            return EMPTY_TURN
        if content.strip() in DELETED_MARKERS:
            return DELETED
        if expected == "assistant" and len(content.strip()) < min_answer_chars:
            return TOO_SHORT  # a per-format threshold: see SourceConfig.min_answer_chars
        total += len(content)
    if total > max_chars:
        return TOO_LONG
    return messages


def padding_efficiency(lengths: list[int], order: list[int], batch_size: int, multiple: int | None) -> float:
    """Non-pad tokens over all tokens when ``order`` is cut into batches padded to their longest sample."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        longest = max(batch)
        if multiple:
            longest = -(-longest // multiple) * multiple
        real += sum(batch)
        padded += longest * len(batch)
    return real / padded if padded else 1.0


@dataclass
class SourceReport:
    """What happened to one source's rows, from reading to batches."""

    name: str
    origin: str = ""
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)
    """The drop thresholds in force (``min_answer_chars``, ``max_chars``, reddit's ``min_score``)."""
    bad_lines: list[int] = field(default_factory=list)
    valid: int = 0
    kept_after_fraction: int = 0
    answer_groups: int = 0
    """Groups of rows that share a normalized answer (a row alone is a group); the split never cuts one."""
    shared_answer_rows: int = 0
    """Rows whose answer another row of the mixture also has (they sit on one side of the split together)."""
    train: int = 0
    val: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    length_mean: float = 0.0
    length_median: float = 0.0
    length_max: int = 0

    def add_lengths(self, lengths: list[int], trained: list[int]) -> None:
        """Fill the token statistics from the tokenized samples of this source."""
        if not lengths:
            return
        self.tokens = int(sum(lengths))
        self.trained_tokens = int(sum(trained))
        self.length_mean = round(statistics.fmean(lengths), 1)
        self.length_median = float(statistics.median(lengths))
        self.length_max = int(max(lengths))

    @property
    def dropped_total(self) -> int:
        """Rows dropped for any reason."""
        return sum(self.dropped.values())

    def dropped_text(self) -> str:
        """Drop counts by reason, then the thresholds behind them, e.g. ``too_short=3 (answer >= 20 chars,
        <= 20000 chars in all, score >= 0.0)``."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "0"
        limits = self.thresholds
        named = [f"answer >= {limits['min_answer_chars']} chars"] if "min_answer_chars" in limits else []
        if "max_chars" in limits:
            named.append(f"<= {limits['max_chars']} chars in all")
        if limits.get("min_score") is not None:
            named.append(f"score >= {limits['min_score']}")
        return reasons + (f" ({', '.join(named)})" if named else "")

    @property
    def groups_text(self) -> str:
        """Answer groups and how many rows share an answer."""
        return f"{self.answer_groups} ({self.shared_answer_rows} rows share)"


@dataclass
class DataReport:
    """The data report of one prepared mixture."""

    sources: list[SourceReport]
    batch_size: int = 0
    padding_efficiency_grouped: float = 0.0
    padding_efficiency_random: float = 0.0
    fingerprint: str = ""

    def source(self, name: str) -> SourceReport:
        """The report of the named source."""
        return next(s for s in self.sources if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (what the JSON file holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        """The report back from ``to_dict`` (or its JSON), leaving ``data`` unchanged."""
        rest = {key: value for key, value in data.items() if key != "sources"}
        return cls(sources=[SourceReport(**s) for s in data["sources"]], **rest)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (creating the folder)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DataReport:
        """Read a report written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> TextTable:
        """The report as a table, one row per source plus a total (``.rich()`` prints it, ``.markdown()`` logs it)."""
        table = TextTable("FinSight data report", ["source", "read", "dropped (by reason, thresholds)", "valid",
                                                   "after fraction", "answer groups", "train", "val", "tokens",
                                                   "trained", "len mean/med/max"], text_columns=(0, 2), total_row=True)
        for s in self.sources:
            reasons = s.dropped_text()
            if s.bad_lines:  # lines that could not be read at all, so the user can open the file there
                shown = ", ".join(map(str, s.bad_lines[:10])) + (", ..." if len(s.bad_lines) > 10 else "")
                reasons += f" (unreadable lines {shown})"
            table.rows.append([s.name, str(s.rows_read), f"{s.dropped_total}: {reasons}", str(s.valid),
                               str(s.kept_after_fraction), s.groups_text, str(s.train), str(s.val), str(s.tokens),
                               str(s.trained_tokens), f"{s.length_mean}/{s.length_median:g}/{s.length_max}"])
        total = lambda attr: str(sum(getattr(s, attr) for s in self.sources))  # noqa: E731
        table.rows.append(["total", total("rows_read"), str(sum(s.dropped_total for s in self.sources)),
                           total("valid"), total("kept_after_fraction"), "", total("train"), total("val"),
                           total("tokens"), total("trained_tokens"), ""])
        table.caption = (
            f"padding efficiency at batch size {self.batch_size}: length-grouped "
            f"{self.padding_efficiency_grouped:.3f}, random batches {self.padding_efficiency_random:.3f}"
        )
        return table

    def print(self) -> None:
        """Print the Rich table to the terminal."""
        console = Console(stderr=True)
        if not console.is_terminal:
            console.width = max(console.width, 160)  # logs and CI: do not squeeze the table to 80 columns
        console.print(self.table().rich())

    def markdown(self) -> str:
        """The report as a Markdown table (for TensorBoard's text tab)."""
        return self.table().markdown()

    def log_to_tensorboard(self, experiment: Any, step: int = 0) -> None:
        """Log the table as text and the counts as scalars to a TensorBoard ``SummaryWriter``."""
        experiment.add_text("data/report", self.markdown(), step)
        for s in self.sources:
            for attr in ("rows_read", "valid", "kept_after_fraction", "answer_groups", "shared_answer_rows", "train",
                         "val", "trained_tokens"):
                experiment.add_scalar(f"data/{s.name}/{attr}", getattr(s, attr), step)
            experiment.add_scalar(f"data/{s.name}/dropped", s.dropped_total, step)
        experiment.add_scalar("data/padding_efficiency_grouped", self.padding_efficiency_grouped, step)
        experiment.add_scalar("data/padding_efficiency_random", self.padding_efficiency_random, step)
