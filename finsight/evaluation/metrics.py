"""Answer quality: financial accuracy against a reference and the coherence of generated text.

Pure functions over strings, plus ``AnswerEvaluator`` which collects answers and aggregates them, and the
helpers ``finsight test`` uses to build its evaluation set and write ``eval_results.json`` / ``.md``
(:mod:`finsight.evaluation.held_out` runs them; :mod:`finsight.evaluation.samples` generates the answers). No model here.

Accuracy (needs a reference answer):

* ``rouge_l``: ROUGE-L F-measure (torchmetrics, no stemmer: nothing to download).
* ``token_f1``: SQuAD token F1 (torchmetrics ``squad``: lower-case, no punctuation or articles, bag of tokens).
* ``numeric_agreement``: share of the reference's numbers that the answer states, after normalising
  amounts (``$1.2 billion`` = ``1,200 million`` = 1.2e9), percentages (``14%`` = ``14 percent``) and
  plain numbers and years, with 0.5% relative tolerance (whole numbers below 10,000, such as years, must
  be equal). Numbers the question already states are not counted; undefined for references with no
  other number.

Coherence (no reference):

* ``distinct_2``: unique word bigrams / all word bigrams, pooled over the answers (low: the answers repeat
  themselves or each other).
* ``repetition_3``: share of an answer's word 3-grams that repeat an earlier 3-gram of the same answer,
  averaged over answers (high: loops).
* ``mean_answer_words``: mean answer length in words (``\\w+`` runs; ``1.2`` and ``26,196`` count as one).
* ``stopped_by_eos``: share of answers that ended with the end-of-turn token instead of running into
  ``max_new_tokens``.
* ``identity``: share of answers to the identity source's prompts that name the assistant (the source's
  ``assistant_name``) and no other assistant; only for runs that trained an identity.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torchmetrics.functional.text import rouge_score, squad

from finsight.data.chat import IGNORE_INDEX
from finsight.data.sources import (
    BUNDLED_ASSISTANT_NAME,
    DataSourceError,
    SourceConfig,
    SourceFormat,
    check_columns,
    conversations,
    read_source,
)
from finsight.errors import FinSightError
from finsight.tables import TextTable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

NUMERIC_TOLERANCE = 0.005
"""Relative tolerance of numeric agreement (0.5%): ``$3.8 billion`` matches ``3,801 million``."""

IDENTITY_PROMPTS = ("Who are you?", "What's your name?", "Hi! Can you introduce yourself?")
"""Identity prompts of the generation samples shown during validation (``finsight test`` asks the identity
source's own held-out prompts)."""

OTHER_IDENTITIES = ("smollm", "llama", "chatgpt", "gpt-4", "gpt-3", "openai", "claude", "anthropic", "gemini",
                    "bard", "mistral", "qwen", "hugging face", "huggingface", "copilot")
"""Names whose mention in an identity answer means the model did not stay FinSight."""

# Row labels of the results: the model under test and, with --compare_base, the base without the adapter.
FINE_TUNED, BASE = "fine_tuned", "base"

# ------------------------------------------------------------------------------------------ words

_WORD = re.compile(r"\w+(?:[.,'’]\w+)*")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; numbers with separators (``26,196``, ``1.2``) and contractions stay whole."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The contiguous n-grams of a token list."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


# ------------------------------------------------------------------------------------------ accuracy


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one answer against its reference (0..1)."""
    # No stemmer and no rougeLsum: both would need nltk data, which is not always downloadable.
    return float(rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"])


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 (0..1): lower-cased, punctuation and articles removed, bag-of-tokens overlap."""
    result = squad([{"prediction_text": prediction, "id": "0"}],
                   [{"answers": {"answer_start": [0], "text": [reference]}, "id": "0"}])
    return float(result["f1"]) / 100.0


_SCALES = {"thousand": 1e3, "k": 1e3, "million": 1e6, "m": 1e6, "mm": 1e6, "mn": 1e6, "billion": 1e9,
           "bn": 1e9, "b": 1e9, "trillion": 1e12, "tn": 1e12, "t": 1e12}
_NUMBER = re.compile(
    r"(?<![\w.])"  # not the tail of a word or of another number ("Q4", "v1.2", "FY23")
    r"(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*(?P<percent>%|percent\b|per\s?cent\b|percentage\s+points?\b)"
    r"|\s*(?P<scale>thousand|million|billion|trillion)\b"
    # Abbreviated scales only when attached ("$3.8B", "5bn"): "5 m" is more often metres than millions.
    r"|(?P<abbr>k|mm|mn|m|bn|b|tn|t)\b)?"
    r"(?!-?[A-Za-z0-9]|[.,]\d)",  # a whole number, not a label like "10-K" or a ratio like "1.2x"
    re.IGNORECASE,
)


# Retirement account names are not amounts: "401k" is not 401,000.
_ACCOUNT_NAMES = re.compile(r"\b(?:401|403|457)\s?\(?[kb]\)?", re.IGNORECASE)


@dataclass(frozen=True)
class Quantity:
    """A number found in text: its value (scale applied) and whether it is a percentage."""

    value: float
    percent: bool = False


def extract_numbers(text: str) -> list[Quantity]:
    """Every amount, percentage, plain number and year in ``text``, normalised for comparison.

    ``$1.2 billion`` and ``1,200 million`` both give 1.2e9; ``14%``, ``14 percent`` and ``14 percentage
    points`` give a percentage of 14; ``2023`` and ``26,196 employees`` give plain numbers. Currency
    symbols are ignored (an answer that drops the ``$`` still states the amount).
    """
    text = re.sub(r"\bFY\s?(\d{4})\b", r"fiscal \1", text)
    text = _ACCOUNT_NAMES.sub(" ", text)
    found = []
    for match in _NUMBER.finditer(text):
        value = float(match["number"].replace(",", ""))
        scale = (match["scale"] or match["abbr"] or "").lower()
        found.append(Quantity(value * _SCALES.get(scale, 1.0), percent=bool(match["percent"])))
    return found


def same_quantity(a: Quantity, b: Quantity, tolerance: float = NUMERIC_TOLERANCE) -> bool:
    """Equal kind (percentage or not) and equal value within a relative tolerance.

    Whole numbers below 10,000 (years, counts, days) must be equal: 0.5% of 2019 would accept 2018.
    """
    if a.percent != b.percent:
        return False
    if a.value.is_integer() and b.value.is_integer() and max(abs(a.value), abs(b.value)) < 10_000:
        return a.value == b.value
    return abs(a.value - b.value) <= tolerance * max(abs(a.value), abs(b.value))


def numeric_agreement(prediction: str, reference: str, tolerance: float = NUMERIC_TOLERANCE,
                      question: str | None = None) -> float | None:
    """Share of the reference's distinct numbers that the prediction states; None when it has none.

    Numbers that the ``question`` already states (``fiscal 2021`` in "What was the debt at the end of
    fiscal 2021?") are left out: echoing them shows nothing about what the model knows.
    """
    given = extract_numbers(question) if question else []
    expected = [number for number in dict.fromkeys(extract_numbers(reference))
                if not any(same_quantity(number, known, tolerance) for known in given)]
    if not expected:
        return None
    stated = extract_numbers(prediction)
    hits = sum(any(same_quantity(want, got, tolerance) for got in stated) for want in expected)
    return hits / len(expected)


# ------------------------------------------------------------------------------------------ coherence


def distinct_n(answers: Iterable[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams, pooled over the answers (n-grams never cross answers)."""
    grams = [gram for answer in answers for gram in ngrams(words(answer), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(answer: str, n: int = 3) -> float:
    """Share of the answer's word n-grams that repeat an earlier n-gram of the same answer."""
    grams = ngrams(words(answer), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def stays_named(answer: str, name: str) -> bool:
    """The answer gives the assistant's own ``name`` and no other assistant or model family."""
    lowered, own = answer.lower(), name.lower()
    others = [other for other in OTHER_IDENTITIES if other not in own]  # an assistant may be called "Mistral"
    return (re.search(rf"\b{re.escape(own)}\b", lowered) is not None
            and not any(re.search(rf"\b{re.escape(other)}\b", lowered) for other in others))


# ------------------------------------------------------------------------------------------ aggregation

AnswerKind = Literal["qa", "identity", "prompt"]


@dataclass
class AnswerRecord:
    """One generated answer and what it is judged against."""

    question: str
    answer: str
    stopped: bool
    """Generation ended with the end-of-turn token (not by ``max_new_tokens``)."""
    kind: AnswerKind = "prompt"
    reference: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    source: str = ""
    """The source (or eval file) the question came from; results are reported per source."""


class AnswerEvaluator:
    """Collects answers and computes the accuracy and coherence metrics over them.

    Accuracy metrics average over answers with a reference (numeric agreement over references that
    contain numbers), ``identity`` over ``identity`` answers, coherence metrics over all answers.
    """

    def __init__(self) -> None:
        self.records: list[AnswerRecord] = []

    def add(self, question: str, answer: str, *, stopped: bool, kind: AnswerKind = "prompt",
            reference: str | None = None, source: str = "", assistant_name: str | None = None) -> AnswerRecord:
        """Score one answer and keep it (an ``identity`` answer is checked for ``assistant_name``)."""
        record = AnswerRecord(question, answer, stopped, kind, reference, source=source)
        if reference is not None:
            record.scores = {"rouge_l": rouge_l(answer, reference), "token_f1": token_f1(answer, reference),
                             "numeric_agreement": numeric_agreement(answer, reference, question=question)}
        if kind == "identity":
            record.scores["identity"] = float(stays_named(answer, assistant_name or BUNDLED_ASSISTANT_NAME))
        record.scores["repetition_3"] = repetition_rate(answer, 3)
        self.records.append(record)
        return record

    def compute(self, source: str | None = None) -> dict[str, float]:
        """The metrics over every answer, or over one source's; a metric with nothing to average over is left
        out rather than reported as 0."""
        records = [r for r in self.records if source is None or r.source == source]
        if not records:
            return {}
        answers = [r.answer for r in records]
        metrics: dict[str, float] = {}
        for key in ("rouge_l", "token_f1", "numeric_agreement", "identity"):
            values = [r.scores[key] for r in records if r.scores.get(key) is not None]
            if values:
                metrics[key] = sum(values) / len(values)
        metrics["distinct_2"] = distinct_n(answers, 2)
        metrics["repetition_3"] = sum(r.scores["repetition_3"] for r in records) / len(records)
        metrics["mean_answer_words"] = sum(len(words(a)) for a in answers) / len(answers)
        metrics["stopped_by_eos"] = sum(r.stopped for r in records) / len(records)
        metrics["answers"] = float(len(records))
        metrics["numeric_references"] = float(sum(r.scores.get("numeric_agreement") is not None for r in records))
        return metrics

    def sources(self) -> list[str]:
        """The sources answered, in the order their first answer came."""
        return list(dict.fromkeys(r.source for r in self.records if r.source))


# ------------------------------------------------------------------------------------------ eval sets


@dataclass
class EvalExample:
    """A prompt to answer: token ids exactly as the model sees them, and the reference when there is one."""

    question: str
    prompt_ids: list[int]
    reference: str | None = None
    kind: AnswerKind = "qa"
    source: str = ""


class EvalSetError(FinSightError, ValueError):
    """An evaluation set that cannot be built; the message names the file or source.

    Fix: point `--eval.file` at an existing file in the format the message names, or `--eval.source` at a source
    of the config that has validation rows.
    """


def _question_markers(encoder: Any, system_prompt: str) -> tuple[str, str]:
    """The template text right before the user's message and right after it (up to the answer)."""
    marker = "\x1eQUESTION\x1e"
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    probe = encoder.render([*system, {"role": "user", "content": marker}], add_generation_prompt=True)
    before, _, after = probe.partition(marker)
    header = before.rpartition(system_prompt)[2] if system_prompt and system_prompt in before else before
    return header.strip(), after.strip()


def question_from_prompt(prompt_text: str, header: str, suffix: str) -> str:
    """The last user message of a rendered prompt (for display in the results; not used to score)."""
    text = prompt_text
    if suffix and suffix in text:
        text = text[: text.rindex(suffix)]
    if header and header in text:
        text = text[text.rindex(header) + len(header) :]
    return text.strip()


def heldout_examples(dataset: Any, source_index: int, tokenizer: PreTrainedTokenizerBase, encoder: Any, system_prompt: str,
                     limit: int | None = None, source: str = "", kind: AnswerKind = "qa") -> list[EvalExample]:
    """Question/reference pairs from tokenized rows (the data module's validation split) of one source.

    The prompt is every token before the first trained token (exactly what the model saw in training,
    ending with the assistant header) and the reference is the trained tokens decoded without special
    tokens: the assistant's answer. Rows are taken in the split's order, up to ``limit``.
    """
    header, suffix = _question_markers(encoder, system_prompt)
    examples = []
    rows = dataset.with_format(None, columns=["input_ids", "labels", "source_index"])
    for row in rows:
        if row["source_index"] != source_index:
            continue
        labels = row["labels"]
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first is None:
            continue
        # Only the first assistant turn: later turns would need the model's own earlier answers.
        end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        prompt_ids = list(row["input_ids"][:first])
        reference = tokenizer.decode(labels[first:end], skip_special_tokens=True).strip()
        question = question_from_prompt(tokenizer.decode(prompt_ids, skip_special_tokens=False), header, suffix)
        examples.append(EvalExample(question, prompt_ids, reference, kind, source))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def check_eval_source(source: str | None, names: Sequence[str]) -> None:
    """Refuse an ``eval.source`` that is not among the run's source names."""
    if source and source not in names:
        raise EvalSetError(f"eval.source {source!r} is not a source of this run; its sources: "
                           f"{', '.join(map(str, names)) or 'none'}")


def eval_file_source(path: str, format: SourceFormat = "qa", columns: dict[str, str] | None = None) -> SourceConfig:
    """The eval file as a source: the same formats, column mapping, reader and checks as training data."""
    if not Path(path).expanduser().is_file():
        raise EvalSetError(f"evaluation file {path!r} does not exist (expected a .jsonl, .json, .csv or .parquet "
                           f"file in the {format!r} format)")
    try:
        return SourceConfig(name=Path(path).stem, path=str(Path(path).expanduser()), format=format, columns=columns,
                            assistant_name="eval" if format == "intro" else None)
    except DataSourceError as error:
        raise EvalSetError(f"evaluation file {path!r}: {error}") from None


def eval_file_conversations(path: str, system_prompt: str, format: SourceFormat = "qa",
                            columns: dict[str, str] | None = None) -> tuple[str, list[list[dict]]]:
    """The eval file's name and its checked conversations; a file with no usable one is an :class:`EvalSetError`.

    Read before any model is loaded, so a bad file stops ``finsight test`` at once.
    """
    source = eval_file_source(path, format, columns)
    try:
        raw = read_source(source, seed=0)
        check_columns(source, raw)
    except DataSourceError as error:
        raise EvalSetError(f"evaluation file {path!r}: {error}") from None
    kept, dropped = conversations(source, raw, system_prompt)
    if not kept:
        raise EvalSetError(f"evaluation file {path!r} ({format} format) has no usable conversation: dropped "
                           + (", ".join(f"{k}={v}" for k, v in sorted(dropped.items())) or "none"))
    return source.name, kept


def conversation_examples(conversations_: Sequence[list[dict]], encoder: Any, source: str,
                          limit: int | None = None) -> list[EvalExample]:
    """Every assistant turn of each conversation as a question, turn by turn: the model answers each user turn
    after the conversation's own earlier turns (the references, not its own answers), so every turn is judged
    against its reference from the same history."""
    examples: list[EvalExample] = []
    for messages in conversations_:
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = encoder.render(messages[:turn], add_generation_prompt=True)
            ids = encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            examples.append(EvalExample(messages[turn - 1]["content"], ids, message["content"], "qa", source))
            if limit is not None and len(examples) >= limit:
                return examples
    return examples


def file_examples(path: str, encoder: Any, system_prompt: str, limit: int | None = None,
                  format: SourceFormat = "qa", columns: dict[str, str] | None = None) -> list[EvalExample]:
    """Question/reference pairs from a file in any source format, multi-turn chats turn by turn.

    The file goes through the same reader and checks as a training source, so a bad row is dropped and
    counted rather than scored, and the prompt is rendered with the training chat template and system
    prompt.
    """
    name, kept = eval_file_conversations(path, system_prompt, format, columns)
    return conversation_examples(kept, encoder, name, limit)


def share_fairly(available: dict[str, int], total: int | None) -> dict[str, int]:
    """How many questions each source gets of ``total``: equal shares, and what a small source cannot use goes
    to the others (None: all of every source)."""
    if total is None:
        return dict(available)
    shares = dict.fromkeys(available, 0)
    left = total
    open_sources = [name for name, count in available.items() if count > 0]
    while left > 0 and open_sources:
        each, extra = divmod(left, len(open_sources))
        for position, name in enumerate(open_sources):
            give = min(each + (position < extra), available[name] - shares[name])
            shares[name] += give
            left -= give
        open_sources = [name for name in open_sources if shares[name] < available[name]]
    return shares


def prompt_examples(encoder: Any, system_prompt: str, prompts: Sequence[str],
                    kind: AnswerKind = "identity") -> list[EvalExample]:
    """Fixed prompts without reference (generation samples), rendered as in training."""
    examples = []
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for question in prompts:
        text = encoder.render([*system, {"role": "user", "content": question}], add_generation_prompt=True)
        ids = encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append(EvalExample(question, ids, None, kind))
    return examples


# ------------------------------------------------------------------------------------------ results

# Display order and labels of the results table; metrics missing from every row are not shown.
METRIC_LABELS = {
    "loss": "test loss (nats/token)",
    "ppl": "perplexity",
    "rouge_l": "ROUGE-L F",
    "token_f1": "token F1",
    "numeric_agreement": "numeric agreement",
    "distinct_2": "distinct-2",
    "repetition_3": "repeated 3-grams",
    "mean_answer_words": "mean answer words",
    "stopped_by_eos": "stopped by end-of-turn",
    "identity": "keeps its identity",
    "answers": "answers",
    "numeric_references": "references with numbers",
}


def _ordered_metrics(rows: dict[str, dict[str, float]]) -> list[str]:
    present = {key for row in rows.values() for key in row}
    return [k for k in METRIC_LABELS if k in present] + sorted(present - set(METRIC_LABELS))


COUNTS = ("answers", "numeric_references")
"""Keys of a results row that count answers rather than measure them."""


def difference(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Fine-tuned minus base, per metric both rows have (counts are not differenced)."""
    if FINE_TUNED not in rows or BASE not in rows:
        return {}
    return {k: rows[FINE_TUNED][k] - rows[BASE][k] for k in rows[FINE_TUNED]
            if k in rows[BASE] and k not in COUNTS}


def _fmt(value: float | None, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.0f}" if key in COUNTS else f"{value:.4f}"


def results_table(rows: dict[str, dict[str, float]], title: str = "finsight test") -> TextTable:
    """The rows side by side (and their difference), for the terminal and for ``eval_results.md``."""
    diff = difference(rows)
    table = TextTable(title, ["metric", *rows, *(["difference"] if diff else [])])
    for key in _ordered_metrics(rows):
        cells = [METRIC_LABELS.get(key, key), *(_fmt(rows[n].get(key), key) for n in rows)]
        if diff:
            cells.append(_fmt(diff.get(key)) if key in diff else "–")
        table.rows.append(cells)
    return table


def per_source_table(per_source: dict[str, dict[str, dict[str, float]]],
                     title: str = "per source") -> TextTable:
    """Every score per source side by side (with the base model's beside each, when compared)."""
    columns = [(source, model) for source, rows in per_source.items() for model in rows]
    table = TextTable(title, ["metric", *(source if model == FINE_TUNED else f"{source} ({model})"
                                          for source, model in columns)])
    merged = {f"{source}/{model}": row for source, rows in per_source.items() for model, row in rows.items()}
    for key in _ordered_metrics(merged):
        table.rows.append([METRIC_LABELS.get(key, key),
                           *(_fmt(per_source[source][model].get(key), key) for source, model in columns)])
    return table


def write_results(folder: str | Path, rows: dict[str, dict[str, float]],
                  samples: dict[str, list[AnswerRecord]], settings: dict[str, Any],
                  per_source: dict[str, dict[str, dict[str, float]]] | None = None) -> tuple[Path, Path]:
    """Write ``eval_results.json`` (rows overall and per source, difference, settings, every answer) and
    ``eval_results.md``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "rows": rows,
        "difference": difference(rows),
        "sources": {source: {"rows": source_rows, "difference": difference(source_rows)}
                    for source, source_rows in (per_source or {}).items()},
        "settings": settings,
        "samples": {name: [asdict(r) for r in records] for name, records in samples.items()},
    }
    json_path = folder / "eval_results.json"
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    lines = ["# finsight test", "", results_table(rows).markdown()]
    if per_source:
        lines += ["", per_source_table(per_source).markdown()]
    described = ", ".join(f"{k}: {v}" for k, v in settings.items())
    lines += [f"Settings: {described}", ""]
    for name, records in samples.items():
        if records:
            lines += [f"## Sample answers ({name})", ""]
            for record in records[:5]:
                lines += [f"**Q:** {record.question}", "", f"**A:** {record.answer or '(empty)'}", ""]
                if record.reference is not None:
                    lines += [f"**Reference:** {record.reference}", ""]
    md_path = folder / "eval_results.md"
    md_path.write_text("\n".join(lines))
    return json_path, md_path
