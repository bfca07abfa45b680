"""`finsight test`'s held-out answers: base and fine-tuned rows side by side, the questions of an eval file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

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
    assert "| stays FinSight |" in (log_dir / "eval_results.md").read_text()
    logged = cli.trainer.logged_metrics
    assert "test/rouge_l" in logged and "test_base/rouge_l" in logged and "test_base/loss" in logged
    # The answers came from the dequantized, merged model; through the 4-bit layers they are the same answers.
    assert payload["settings"]["generation_model"].startswith("NF4 weights dequantized to float32 with the adapter")
    four_bit = main(tiny_test_args(tiny_model_dir, tmp_path / "4bit", "--ckpt_path", str(run["best"]),
                                   "--eval.compare_base=true", "--eval.inference=4bit"))
    again = json.loads((Path(four_bit.trainer.log_dir) / "eval_results.json").read_text())
    assert again["settings"]["generation_model"].startswith("4-bit layers as trained")
    assert again["rows"] == rows and again["samples"] == payload["samples"]


def test_finsight_test_answers_the_questions_of_an_eval_file(tiny_model_dir, tmp_path_factory, tmp_path):
    from helpers import sampled_fit, tiny_test_args

    from finsight.cli.lightning_cli import main

    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"question": f"What was revenue in {year}?",
                                        "answer": f"Revenue was ${year - 2000}.5 billion in {year}."}) + "\n"
                            for year in (2019, 2020)))
    cli = main(tiny_test_args(tiny_model_dir, tmp_path, f"--model.adapter_path={run['adapter']}",
                              f"--eval.file={path}", "--trainer.limit_test_batches=1"))
    payload = json.loads((Path(cli.trainer.log_dir) / "eval_results.json").read_text())
    assert set(payload["rows"]) == {FINE_TUNED}
    qa = [s for s in payload["samples"][FINE_TUNED] if s["kind"] == "qa"]
    assert [s["question"] for s in qa] == ["What was revenue in 2019?", "What was revenue in 2020?"]
    assert payload["rows"][FINE_TUNED]["numeric_references"] == 2
    assert payload["settings"]["eval_set"] == f"file {path}"
