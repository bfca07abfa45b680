"""`finsight test`'s held-out answers: base and fine-tuned rows side by side, the questions of an eval file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finsight.evaluation.held_out import PREFIXES as PREFIX
from finsight.evaluation.held_out import HeldOutEvaluator
from finsight.evaluation.metrics import (
    BASE,
    FINE_TUNED,
)


def test_finsight_test_compare_base_writes_both_rows(tiny_model_dir, tmp_path_factory, tmp_path):
    from helpers import sampled_fit, tiny_test_args

    from finsight.cli.lightning_cli import main

    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    cli = main(tiny_test_args(tiny_model_dir, tmp_path, "--ckpt_path", str(run["best"]), "--eval.compare_base=true"))
    evaluator = next(c for c in cli.trainer.callbacks if isinstance(c, HeldOutEvaluator))
    assert evaluator.compare_base and evaluator.results[BASE]["loss"] > 0
    log_dir = Path(cli.trainer.log_dir)
    payload = json.loads((log_dir / "eval_results.json").read_text())
    rows = payload["rows"]
    assert set(rows) == {FINE_TUNED, BASE}
    for row in rows.values():
        for key in ("loss", "ppl", "rouge_l", "token_f1", "numeric_agreement", "distinct_2", "repetition_3",
                    "mean_answer_words", "stopped_by_eos", "identity"):
            assert math.isfinite(row[key]), key
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]), rel=1e-4)
    # The adapter was trained, so disabling it changes the loss; both rows answered the same questions.
    assert rows[FINE_TUNED]["loss"] != rows[BASE]["loss"]
    questions = [s["question"] for s in payload["samples"][FINE_TUNED]]
    assert questions == [s["question"] for s in payload["samples"][BASE]]
    n_qa = payload["settings"]["questions"]
    assert n_qa == sum(s["kind"] == "qa" for s in payload["samples"][FINE_TUNED]) > 0
    assert all(s["reference"] for s in payload["samples"][FINE_TUNED] if s["kind"] == "qa")
    assert payload["settings"]["max_new_tokens"] == 6  # the command line wins over the checkpoint
    markdown = (log_dir / "eval_results.md").read_text()
    assert "| keeps its identity |" in markdown
    logged = cli.trainer.logged_metrics
    assert "test/rouge_l" in logged and "test_base/rouge_l" in logged and "test_base/loss" in logged
    # Every source with validation rows was asked, up to max_samples in all, and scored on its own.
    asked = payload["settings"]["questions_per_source"]
    assert set(asked) == set(payload["sources"]) == {"reddit_finance", "company_qa", "intro"}
    assert sum(asked.values()) == len(payload["samples"][FINE_TUNED])
    for source, result in payload["sources"].items():
        assert set(result["rows"]) == {FINE_TUNED, BASE}
        assert result["rows"][FINE_TUNED]["answers"] == asked[source]
        for model in (FINE_TUNED, BASE):
            assert f"{PREFIX[model]}{source}/rouge_l" in logged
        assert f"| {source} | {source} (base) |" in markdown
    # The loss per source, of the sources the two loss batches held (the validation order has one per batch).
    assert sum(f"test/{source}/loss" in logged for source in asked) == 2
    # The identity is checked on the identity source's own prompts, for the name it trains.
    assert payload["settings"]["assistant_name"] == "FinSight"
    identity = [s for s in payload["samples"][FINE_TUNED] if s["kind"] == "identity"]
    assert identity and {s["source"] for s in identity} == {"intro"}
    assert "identity" in payload["sources"]["intro"]["rows"][FINE_TUNED]
    assert "identity" not in payload["sources"]["company_qa"]["rows"][FINE_TUNED]
    # The answers came from the dequantized, merged model; through the 4-bit layers they are the same answers.
    assert payload["settings"]["generation_model"].startswith("NF4 weights dequantized to float32 with the adapter")
    four_bit = main(tiny_test_args(tiny_model_dir, tmp_path / "4bit", "--ckpt_path", str(run["best"]),
                                   "--eval.compare_base=true", "--eval.inference=4bit"))
    again = json.loads((Path(four_bit.trainer.log_dir) / "eval_results.json").read_text())
    assert again["settings"]["generation_model"].startswith("4-bit layers as trained")
    assert again["rows"] == rows and again["samples"] == payload["samples"]


def test_finsight_test_answers_the_questions_of_an_eval_file(tiny_model_dir, tmp_path_factory, tmp_path):
    """A ShareGPT file with its own key names, one chat of two turns: every turn is asked and scored."""
    from helpers import sampled_fit, tiny_test_args

    from finsight.cli.lightning_cli import main

    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    path = tmp_path / "held_out_chats.jsonl"
    path.write_text(json.dumps({"dialog": [
        {"speaker": "human", "text": "What was revenue in 2019?"},
        {"speaker": "gpt", "text": "Revenue was $19.5 billion in 2019."},
        {"speaker": "human", "text": "And in 2020?"},
        {"speaker": "gpt", "text": "Revenue was $20.5 billion in 2020."}]}) + "\n")
    cli = main(tiny_test_args(tiny_model_dir, tmp_path, f"--model.adapter_path={run['adapter']}",
                              f"--eval.file={path}", "--eval.format=sharegpt",
                              '--eval.columns={"conversations": "dialog", "from": "speaker", "value": "text"}',
                              "--trainer.limit_test_batches=1"))
    payload = json.loads((Path(cli.trainer.log_dir) / "eval_results.json").read_text())
    assert set(payload["rows"]) == {FINE_TUNED}
    qa = [s for s in payload["samples"][FINE_TUNED] if s["kind"] == "qa"]
    assert [s["question"] for s in qa] == ["What was revenue in 2019?", "And in 2020?"]
    assert [s["reference"] for s in qa] == ["Revenue was $19.5 billion in 2019.", "Revenue was $20.5 billion in 2020."]
    assert {s["source"] for s in qa} == {"held_out_chats"}
    assert payload["rows"][FINE_TUNED]["numeric_references"] == 2
    assert payload["settings"]["eval_set"] == f"file {path} (sharegpt)"
    assert payload["sources"]["held_out_chats"]["rows"][FINE_TUNED]["answers"] == 2


def test_each_turn_is_asked_after_the_reference_history(tiny_model_dir):
    """A multi-turn chat in an eval file: turn 2's prompt holds turn 1's reference answer, not a model answer."""
    from transformers import AutoTokenizer

    from finsight.data.chat import ChatEncoder
    from finsight.evaluation.metrics import conversation_examples

    encoder = ChatEncoder.untruncated(AutoTokenizer.from_pretrained(tiny_model_dir))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q one"},
            {"role": "assistant", "content": "A one"}, {"role": "user", "content": "Q two"},
            {"role": "assistant", "content": "A two"}]
    first, second = conversation_examples([chat], encoder, "mine")
    assert (first.question, first.reference, second.question, second.reference) == ("Q one", "A one", "Q two", "A two")
    assert second.prompt_ids[:len(first.prompt_ids)] == first.prompt_ids
    decoded = encoder.tokenizer.decode(second.prompt_ids)
    assert "A one" in decoded and "A two" not in decoded and decoded.count("Be brief.") == 1
    assert conversation_examples([chat], encoder, "mine", limit=1) == [first]


def test_questions_are_shared_fairly_between_sources():
    from finsight.evaluation.metrics import share_fairly

    assert share_fairly({"a": 100, "b": 100, "c": 100}, 10) == {"a": 4, "b": 3, "c": 3}
    assert share_fairly({"a": 2, "b": 100, "c": 100}, 10) == {"a": 2, "b": 4, "c": 4}  # what a cannot use
    assert share_fairly({"a": 2, "b": 3}, 100) == {"a": 2, "b": 3}
    assert share_fairly({"a": 2, "b": 3}, None) == {"a": 2, "b": 3}
    assert share_fairly({"a": 0, "b": 3}, 2) == {"a": 0, "b": 2}


@pytest.mark.parametrize("bad, expected", [
    ("--eval.source=nope", r"error: eval.source 'nope' is not a source of this run; its sources: reddit_finance, "
                           r"company_qa, intro"),
    ("--eval.file={missing}", r"error: evaluation file .*missing.jsonl. does not exist \(expected a .jsonl, .json, "
                              r".csv or .parquet file in the .qa. format\)"),
    ("--eval.file={wrong}", r"error: evaluation file '.*wrong.csv': source 'wrong' .*question.*"),
])
def test_a_bad_eval_source_or_file_is_one_error_line_before_any_model_is_loaded(tiny_model_dir, tmp_path, monkeypatch,
                                                                                capsys, bad, expected):
    import re

    from helpers import error_lines, run_entry, tiny_test_args

    (tmp_path / "wrong.csv").write_text("prompt,response\nWhat is a bond?,A loan.\n")
    argument = bad.format(missing=tmp_path / "missing.jsonl", wrong=tmp_path / "wrong.csv")
    loaded = []
    monkeypatch.setattr("finsight.training.module.load_peft_model", lambda *a, **k: loaded.append(1))
    status, stderr = run_entry(monkeypatch, capsys, tiny_test_args(tiny_model_dir, tmp_path, argument))
    lines = error_lines(stderr)
    assert status == 1 and len(lines) == 1 and re.fullmatch(expected, lines[0]), lines
    assert not loaded


def _prepared(tiny_model_dir, sources: list[dict], system_prompt: str):
    from finsight import FinSightDataModule

    dm = FinSightDataModule(sources=sources, tokenizer=str(tiny_model_dir), max_length=512, num_proc=1,
                            val_fraction=0.2, system_prompt=system_prompt)
    dm.setup("fit")
    return dm


def test_your_own_assistant_is_asked_and_checked_for_its_own_name(tiny_model_dir, tmp_path):
    """An identity source of the user's own, with its own assistant name and system prompt: the identity prompts
    are that source's held-out chats, rendered with the run's system prompt, and answers are checked for that
    name; a run without an identity source has no identity check at all."""
    from types import SimpleNamespace

    from finsight.evaluation.held_out import identity_name
    from finsight.evaluation.metrics import AnswerEvaluator

    chats = tmp_path / "who.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: who are you?"},
        {"role": "assistant", "content": f"I am Ledger, your bookkeeping assistant (answer {i})."}]}) + "\n"
        for i in range(20)))
    own_prompt = "You are Ledger, a bookkeeping assistant."
    dm = _prepared(tiny_model_dir, [{"name": "company_qa", "path": "bundled:company_qa", "format": "qa"},
                                    {"name": "who", "path": str(chats), "format": "intro", "rows": 20,
                                     "assistant_name": "Ledger"}], own_prompt)
    assert identity_name(dm) == "Ledger"
    examples, described = HeldOutEvaluator(max_samples=8).examples(SimpleNamespace(datamodule=dm), dm.tokenizer,
                                                                   dm.system_prompt)
    identity = [e for e in examples if e.kind == "identity"]
    assert identity and {e.source for e in identity} == {"who"}
    assert all(e.question.startswith("Question ") and "Ledger" in e.reference for e in identity)
    assert all(own_prompt in dm.tokenizer.decode(e.prompt_ids) for e in examples)
    assert len(examples) == 8 and "company_qa (4)" in described
    evaluator = AnswerEvaluator()
    evaluator.add("Who are you?", "I am Ledger.", stopped=True, kind="identity", source="who", assistant_name="Ledger")
    evaluator.add("Who are you?", "I am FinSight.", stopped=True, kind="identity", source="who", assistant_name="Ledger")
    assert evaluator.compute("who")["identity"] == 0.5

    # No identity source: nothing is checked for a name.
    plain = _prepared(tiny_model_dir, [{"name": "company_qa", "path": "bundled:company_qa", "format": "qa"}], "")
    assert identity_name(plain) is None
    examples, _ = HeldOutEvaluator(max_samples=4).examples(SimpleNamespace(datamodule=plain), plain.tokenizer, "")
    assert [e.kind for e in examples] == ["qa"] * 4
    assert "You are FinSight" not in plain.tokenizer.decode(examples[0].prompt_ids)


def test_stays_named_accepts_the_own_name_only():
    from finsight.evaluation.metrics import stays_named

    assert stays_named("Hi, I'm Ledger.", "Ledger")
    assert not stays_named("Hi, I'm Ledger, built on Llama.", "Ledger")
    assert not stays_named("Hi, I'm FinSight.", "Ledger")
    assert stays_named("I am Mistral, your assistant.", "Mistral")  # an own name that is also a model's
