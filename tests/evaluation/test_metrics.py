"""Answer metrics on fixed strings (hand-computed values), evaluation sets and result files."""

from __future__ import annotations

import json

import pytest

from finsight.evaluation.metrics import (
    BASE,
    FINE_TUNED,
    AnswerEvaluator,
    EvalSetError,
    Quantity,
    distinct_n,
    extract_numbers,
    file_examples,
    heldout_examples,
    numeric_agreement,
    repetition_rate,
    results_table,
    rouge_l,
    stays_named,
    token_f1,
    words,
    write_results,
)

# ------------------------------------------------------------------------------------------ accuracy


def test_rouge_l_is_the_lcs_f_measure():
    # LCS "the cat on the mat" = 5 of 6 words on both sides.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6, abs=1e-6)
    # Punctuation is dropped: LCS 3, precision 3/4, recall 3/3.
    assert rouge_l("revenue grew 4 percent", "Revenue grew 4%.") == pytest.approx(2 * 0.75 / 1.75, abs=1e-6)
    assert rouge_l("", "revenue grew") == 0.0


def test_token_f1_normalises_case_punctuation_and_articles():
    # "cat sat" vs "cat sat down": precision 1, recall 2/3.
    assert token_f1("The cat sat", "a cat sat down") == pytest.approx(0.8)
    # "revenue was 38 billion" vs "revenue of 38 billion" ("$3.8" loses its punctuation): 3 of 4 each way.
    assert token_f1("Revenue was $3.8 billion.", "revenue of $3.8 billion") == pytest.approx(0.75)
    assert token_f1("completely different", "nothing shared") == 0.0


@pytest.mark.parametrize(("text", "expected"), [
    ("$1.2 billion", [Quantity(1.2e9)]),
    ("1,200 million", [Quantity(1.2e9)]),
    ("$3.8B and 250k", [Quantity(3.8e9), Quantity(250e3)]),
    ("14%", [Quantity(14, percent=True)]),
    ("14 percent, 2.5 per cent, 3 percentage points",
     [Quantity(14, percent=True), Quantity(2.5, percent=True), Quantity(3, percent=True)]),
    ("26,196 employees in fiscal 2023", [Quantity(26196), Quantity(2023)]),
    ("FY2023", [Quantity(2023)]),
    ("its 10-K, a 401(k) plan and Q4", []),
])
def test_numbers_are_extracted_and_normalised(text, expected):
    assert extract_numbers(text) == expected


def test_numeric_agreement_counts_the_reference_numbers_the_answer_states():
    assert numeric_agreement("Revenue was 1,200 million dollars.", "Revenue was $1.2 billion.") == 1.0
    assert numeric_agreement("It grew 14 percent.", "It grew 14%.") == 1.0
    assert numeric_agreement("It grew 14.", "It grew 14%.") == 0.0  # a plain 14 is not a percentage
    # 4% and $3.8 billion are stated, 2019 is not.
    reference = "Revenue increased 4% in fiscal 2019, to $3.8 billion."
    assert numeric_agreement("Revenue rose 4 percent to 3,800 million in 2018.", reference) == pytest.approx(2 / 3)
    # 0.5% relative tolerance: 3.81 is within 0.27% of 3.8, 3.9 is 2.6% off.
    assert numeric_agreement("$3.81 billion", "$3.8 billion") == 1.0
    assert numeric_agreement("$3.9 billion", "$3.8 billion") == 0.0
    assert numeric_agreement("26196 staff", "26,196 employees") == 1.0
    assert numeric_agreement("in fiscal 2018", "in fiscal 2019") == 0.0  # whole numbers below 10,000: exact
    assert numeric_agreement("anything", "No dividends were paid.") is None
    # A year copied from the question is not knowledge: only the amount counts.
    question = "What was the long-term debt at the end of fiscal 2021?"
    assert numeric_agreement("In fiscal 2021 it was $1.1 trillion.", "$2.3 billion as of December 31, 2021.",
                             question=question) == 0.0
    assert numeric_agreement("x", "It was 2021.", question=question) is None


# ------------------------------------------------------------------------------------------ coherence


def test_distinct_2_pools_bigrams_over_answers():
    # Bigrams: ab ba ab | ab bc: 5 in all, 3 distinct.
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    assert distinct_n(["one"], 2) == 0.0


def test_repetition_rate_counts_repeated_trigrams():
    # 8 words, 6 trigrams, 3 of them repeat an earlier one.
    assert repetition_rate("the cat sat the cat sat the cat", 3) == pytest.approx(0.5)
    assert repetition_rate("no repeats in this answer at all", 3) == 0.0
    assert words("It had 26,196 employees, $1.2 billion.") == ["it", "had", "26,196", "employees", "1.2", "billion"]


def test_identity_check():
    assert stays_named("I'm FinSight, a finance assistant.", "FinSight")
    assert not stays_named("I am SmolLM, trained by Hugging Face.", "FinSight")
    assert not stays_named("I'm FinSight, built on Llama.", "FinSight")
    assert not stays_named("I am a helpful assistant.", "FinSight")


def test_evaluator_averages_each_metric_over_the_answers_it_applies_to():
    evaluator = AnswerEvaluator()
    evaluator.add("q1", "Revenue grew 14% to $2 billion", stopped=True, kind="qa",
                  reference="Revenue grew 14% to $2.5 billion")
    evaluator.add("q2", "It pays no dividend", stopped=False, kind="qa", reference="It pays no dividend")
    evaluator.add("Who are you?", "I'm FinSight.", stopped=True, kind="identity")
    metrics = evaluator.compute()
    assert metrics["answers"] == 3
    assert metrics["numeric_references"] == 1
    assert metrics["numeric_agreement"] == pytest.approx(0.5)  # 14% found, $2.5 billion not; q2 has no numbers
    assert metrics["token_f1"] == pytest.approx((token_f1("Revenue grew 14% to $2 billion",
                                                          "Revenue grew 14% to $2.5 billion") + 1.0) / 2)
    # "revenue grew 14 to 2 billion" in "revenue grew 14 to 2 5 billion": precision 1, recall 6/7.
    assert metrics["rouge_l"] == pytest.approx((12 / 13 + 1.0) / 2, abs=1e-6)
    assert metrics["identity"] == 1.0
    assert metrics["stopped_by_eos"] == pytest.approx(2 / 3)
    assert metrics["mean_answer_words"] == pytest.approx((6 + 4 + 2) / 3)
    assert AnswerEvaluator().compute() == {}


# ------------------------------------------------------------------------------------------ eval sets


def test_heldout_examples_recover_question_and_reference_from_tokenized_rows(tiny_tokenizer):
    import datasets

    from finsight.data.chat import ChatEncoder

    encoder = ChatEncoder(tiny_tokenizer, 512)
    system = "You are FinSight."
    rows = [("What was the revenue in 2023?", "Revenue was $1.2 billion in fiscal 2023.", 1),
            ("Is this a reddit post?", "Yes, this one is from another source.", 0),
            ("How many employees?", "About 26,196 employees.", 1)]
    messages = [[{"role": "system", "content": system}, {"role": "user", "content": q},
                 {"role": "assistant", "content": a}] for q, a, _ in rows]
    encoded = encoder.encode_batch({"messages": messages})
    dataset = datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "labels": encoded["labels"],
                                          "source_index": [s for _, _, s in rows]})
    examples = heldout_examples(dataset, 1, tiny_tokenizer, encoder, system)
    assert [(e.question, e.reference) for e in examples] == [(rows[0][0], rows[0][1]), (rows[2][0], rows[2][1])]
    # The prompt is the conversation rendered up to the assistant header, as in training.
    prompt = encoder.render(messages[0][:2], add_generation_prompt=True)
    assert tiny_tokenizer.decode(examples[0].prompt_ids) == prompt
    assert len(heldout_examples(dataset, 1, tiny_tokenizer, encoder, system, limit=1)) == 1


def test_file_examples_read_a_qa_file_with_the_training_checks(tiny_tokenizer, tmp_path):
    from finsight.data.chat import ChatEncoder

    encoder = ChatEncoder(tiny_tokenizer, 512)
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"question": "What is EBITDA?", "answer": "Earnings before interest, taxes, "
                                "depreciation and amortization."}) + "\n"
                    + json.dumps({"question": "No answer here"}) + "\n")
    examples = file_examples(str(path), encoder, "You are FinSight.")
    assert [(e.question, e.kind) for e in examples] == [("What is EBITDA?", "qa")]
    assert examples[0].reference.startswith("Earnings before interest")
    assert tiny_tokenizer.decode(examples[0].prompt_ids).endswith("What is EBITDA?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(EvalSetError, match="does not exist"):
        file_examples(str(tmp_path / "missing.jsonl"), encoder, "s")


def test_results_files_hold_both_rows_and_their_difference(tmp_path):
    rows = {FINE_TUNED: {"loss": 1.5, "rouge_l": 0.5, "answers": 4.0},
            BASE: {"loss": 2.0, "rouge_l": 0.25, "answers": 4.0}}
    json_path, md_path = write_results(tmp_path, rows, {FINE_TUNED: [], BASE: []}, {"eval_set": "x"})
    payload = json.loads(json_path.read_text())
    assert payload["rows"] == rows
    assert payload["difference"] == {"loss": -0.5, "rouge_l": 0.25}  # counts are not differenced
    table = md_path.read_text()
    assert "| ROUGE-L F | 0.5000 | 0.2500 | 0.2500 |" in table
    assert "| answers | 4 | 4 | – |" in table
    assert results_table({FINE_TUNED: {"loss": 1.0}}).markdown().splitlines()[0] == "| metric | fine_tuned |"


# ------------------------------------------------------------------------------------------ finsight test




