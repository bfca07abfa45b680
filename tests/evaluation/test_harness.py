"""lm-evaluation-harness on finsight's generation model: a local task folder (multiple choice and generate-until)
scored by the harness equals the score computed by hand from the model's log-likelihoods and greedy answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import sampled_fit, tiny_test_args

from finsight.evaluation.harness import HarnessError, run_harness

QUESTIONS = ["Revenue rose. Margin?", "What is a bond?", "Define EBITDA.", "Is cash an asset?", "What is a 10-K?",
             "Who sets rates?"]
CHOICES = [["up", "down", "flat"], ["debt", "stock", "cash"], ["earnings", "debt", "rent"],
           ["yes", "no", "maybe"], ["a filing", "a loan", "a tax"], ["the Fed", "banks", "nobody"]]
ANSWERS = [0, 0, 1, 0, 2, 1]


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probabilities of ``continuation``'s tokens after ``context``, split as the harness splits."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logits[i - 1, whole[i]]) for i in range(start, len(whole)))


def _greedy(model, tokenizer, context: str, max_tokens: int) -> str:
    ids = tokenizer(context, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _task_folder(folder: Path, generated_targets: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": q, "choices": c, "answer": a, "target": t}
            for q, c, a, t in zip(QUESTIONS, CHOICES, ANSWERS, generated_targets)]
    data = folder / "finance.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "Question: {{question}}\nAnswer:"}
    (folder / "finance_mc.yaml").write_text(yaml.safe_dump({
        "task": "finance_mc", **common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}))
    (folder / "finance_gen.yaml").write_text(yaml.safe_dump({
        "task": "finance_gen", **common, "output_type": "generate_until", "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finsight.model.loading import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), load_tokenizer(
        str(tiny_model_dir))


def test_a_local_task_scores_what_the_log_likelihoods_and_greedy_answers_give(tiny, tmp_path):
    model, tokenizer = tiny
    contexts = [f"Question: {q}\nAnswer:" for q in QUESTIONS]
    # Multiple choice: the choice with the highest log-likelihood (the harness puts " " before each choice).
    picked = [max(range(len(c)), key=lambda i, ctx=ctx, c=c: _continuation_logprob(model, tokenizer, ctx, " " + c[i]))
              for ctx, c in zip(contexts, CHOICES)]
    expected_acc = sum(p == a for p, a in zip(picked, ANSWERS)) / len(ANSWERS)
    # Generate-until: the targets of half the questions are the model's own greedy answers (cut at "\n").
    greedy = [_greedy(model, tokenizer, ctx, 3).split("\n")[0] for ctx in contexts]
    targets = [g if i % 2 == 0 else g + " never" for i, g in enumerate(greedy)]
    folder = _task_folder(tmp_path / "tasks", targets)
    scores = run_harness(model, tokenizer, ["finance_mc", "finance_gen"], include_path=str(folder))
    assert scores["harness/finance_mc/acc"] == pytest.approx(expected_acc), (picked, expected_acc)
    assert 0 < expected_acc < 1  # some right, some wrong: a harness that scored otherwise would show
    assert scores["harness/finance_gen/exact_match"] == pytest.approx(0.5)


def test_an_unknown_task_is_named(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(HarnessError, match="no harness task named finance_nothing .nor in"):
        run_harness(model, tokenizer, ["finance_nothing"], include_path=str(tmp_path))


def test_finsight_test_runs_the_harness_on_both_models(tiny_model_dir, tmp_path_factory, tmp_path):
    from finsight.cli.lightning_cli import main

    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    folder = _task_folder(tmp_path / "tasks", ["x"] * len(QUESTIONS))
    cli = main(tiny_test_args(tiny_model_dir, tmp_path, f"--ckpt_path={run['best']}", "--eval.compare_base=true",
                              "--eval.harness_tasks=[finance_mc]", f"--eval.harness_include_path={folder}",
                              "--eval.max_samples=2"))
    results = json.loads((Path(cli.trainer.log_dir) / "eval_results.json").read_text())
    fine_tuned, base = (results["rows"][name]["harness/finance_mc/acc"] for name in results["rows"])
    assert 0 <= fine_tuned <= 1 and 0 <= base <= 1
    assert "test/harness/finance_mc/acc" in cli.trainer.callback_metrics
    assert results["settings"]["harness_tasks"] == ["finance_mc"]
