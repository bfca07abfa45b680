"""Formatting and the assistant-only label mask, checked against renderings written by hand in the tests."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from helpers import (
    LLAMA2_TEMPLATE,
    NO_SYSTEM_TEMPLATE,
    chatml_segments,
    encode_segments,
    llama2_segments,
    no_system_segments,
    rows_of,
    write_jsonl,
)

from finsight import FinSightDataModule
from finsight.data import quality
from finsight.data.chat import IGNORE_INDEX, ChatEncoder, ChatTemplateError
from finsight.data.sources import DEFAULT_SYSTEM_PROMPT

ANSWERS = [
    "An index fund holds every stock of an index, so its fees stay low.",
    "Compound interest pays interest on earlier interest as well as on the principal.",
    "Bonds pay a fixed coupon; their price falls when market rates rise.",
    "Diversification spreads money over many assets so one failure hurts less.",
    "An emergency fund covers three to six months of essential expenses.",
    "Dollar-cost averaging invests a fixed amount on a schedule, whatever the price.",
]
QUESTIONS = ["What is an index fund?", "How does compound interest work?", "Why do bond prices move?",
             "What does diversification do?", "How big should an emergency fund be?",
             "What is dollar-cost averaging?"]


def conversations() -> list[list[dict]]:
    """Single- and multi-turn chats, some with their own system prompt."""
    chats = []
    for i in range(12):
        turns = 1 + i % 3
        messages = [{"role": "system", "content": f"You answer finance questions briefly, style {i}."}] if i % 2 else []
        for t in range(turns):
            k = (i + t) % len(QUESTIONS)
            messages += [{"role": "user", "content": f"{QUESTIONS[k]} (case {i}.{t})"},
                         {"role": "assistant", "content": f"{ANSWERS[k]} Case {i}.{t}."}]
        chats.append(messages)
    return chats


def with_default_system(messages: list[dict]) -> list[dict]:
    if messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]


def prepared(tokenizer, tmp_path: Path, chats: list[list[dict]], **kwargs) -> FinSightDataModule:
    source = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in chats])
    dm = FinSightDataModule(sources=[{"name": "chats", "path": str(source), "format": "messages"}],
                            tokenizer=tokenizer, val_fraction=0.0, cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup("fit")
    return dm


def assert_matches(dm: FinSightDataModule, expected: list[tuple[list[int], list[int]]]) -> None:
    """Every prepared sample is one of the expected encodings, with exactly its labels, and none is missing."""
    by_ids = {tuple(ids): labels for ids, labels in expected}
    rows = rows_of(dm.train_dataset)
    assert len(rows) == len(expected)
    for row in rows:
        assert tuple(row["input_ids"]) in by_ids, "a sample's tokens differ from the independent rendering"
        assert row["labels"] == by_ids[tuple(row["input_ids"])]
        assert row["trained"] == sum(label != IGNORE_INDEX for label in row["labels"])


def test_chatml_labels_train_only_answers_and_their_end_token(tiny_tokenizer, tmp_path):
    chats = conversations()
    dm = prepared(tiny_tokenizer, tmp_path, chats)
    expected = [encode_segments(tiny_tokenizer, chatml_segments(with_default_system(m))) for m in chats]
    assert_matches(dm, expected)

    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tiny_tokenizer("\n", add_special_tokens=False)["input_ids"]
    for row in rows_of(dm.train_dataset):
        ids, labels = row["input_ids"], row["labels"]
        ends = [i for i, t in enumerate(ids) if t == im_end]
        trained_ends = [i for i in ends if labels[i] == im_end]
        # Each assistant turn's <|im_end|> is trained; the system's and users' are not.
        turns = sum(1 for i in range(len(ids) - 1) if labels[i] == IGNORE_INDEX and labels[i + 1] != IGNORE_INDEX)
        assert len(trained_ends) == turns >= 1
        assert len(ends) == 2 * turns + 1  # system, then user and assistant per turn
        for i in trained_ends:
            if i + 1 < len(ids):
                assert ids[i + 1 : i + 2] == newline and labels[i + 1] == IGNORE_INDEX
        # Nothing before the first answer (system and first user turn) is trained.
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert tiny_tokenizer.decode(ids[:first]).endswith("<|im_start|>assistant\n")


def test_encoder_spans_cover_answer_and_end_token(tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, max_length=512)
    messages = with_default_system(conversations()[2])
    text, spans = encoder.assistant_spans(messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [text[begin:end] for begin, end in spans] == [a + "<|im_end|>" for a in answers]
    assert text == "".join(segment for segment, _ in chatml_segments(messages))


@pytest.mark.parametrize("kind", ["no_system", "llama2"])
def test_other_templates_mask_like_their_hand_rendering(tiny_tokenizer, tmp_path, kind):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE if kind == "no_system" else LLAMA2_TEMPLATE
    encoder = ChatEncoder(tokenizer, max_length=512)
    assert encoder.accepts_system is (kind == "llama2")

    chats = conversations()
    dm = prepared(tokenizer, tmp_path, chats)
    render = no_system_segments if kind == "no_system" else llama2_segments
    expected = [encode_segments(tokenizer, render(with_default_system(m), tokenizer.bos_token,
                                                  tokenizer.eos_token)) for m in chats]
    assert_matches(dm, expected)
    if kind == "no_system":  # the system prompt reaches the model, inside the first user turn
        chat = with_default_system(chats[0])
        assert encoder.render(chat).startswith(
            f"{tokenizer.bos_token}[INST] {DEFAULT_SYSTEM_PROMPT}\n\n{chat[1]['content']} [/INST]")


def test_missing_pad_token_is_set_and_padding_is_never_trained(tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    tokenizer.unk_token = None
    dm = prepared(tokenizer, tmp_path, conversations(), batch_size=4, pad_to_multiple_of=8)
    eos = tokenizer.eos_token_id
    assert dm.tokenizer.pad_token_id == eos  # the hard case: the pad token is the trained end-of-turn token
    trained_ends = padded = 0
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] % 8 == 0
        pad = batch["attention_mask"] == 0
        assert (batch["labels"][pad] == IGNORE_INDEX).all()
        assert (batch["input_ids"][pad] == eos).all()
        padded += int(pad.sum())
        trained_ends += int(((batch["labels"] == eos) & ~pad).sum())
    expected_turns = sum(sum(m["role"] == "assistant" for m in chat) for chat in conversations())
    assert padded > 0 and trained_ends == expected_turns


def test_truncation_drops_samples_left_without_a_trained_token(tiny_tokenizer, tmp_path):
    chats = []
    for i in range(10):
        question = f"Question {i}: " + "tell me more about budgets and savings " * (2 + 4 * (i % 2))
        chats.append([{"role": "user", "content": question.strip()},
                      {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)] + f" Case {i}." * 10}])
    prompt_lengths = []
    for chat in chats:
        ids, labels = encode_segments(tiny_tokenizer, chatml_segments(with_default_system(chat)))
        prompt_lengths.append(next(i for i, label in enumerate(labels) if label != IGNORE_INDEX))
    # Between the short and the long prompts: long ones lose every answer token, short ones keep some.
    max_length = (max(prompt_lengths[0::2]) + min(prompt_lengths[1::2])) // 2
    lost = sum(length >= max_length for length in prompt_lengths)
    assert lost == len(chats) // 2

    dm = prepared(tiny_tokenizer, tmp_path, chats, max_length=max_length)
    report = dm.report.source("chats")
    assert report.dropped == {quality.NO_TRAINED_TOKENS: lost}
    assert report.kept_after_fraction == report.train + lost
    for row in rows_of(dm.train_dataset):
        assert len(row["input_ids"]) == max_length  # every kept sample here is long enough to be cut
        assert row["labels"][-1] != IGNORE_INDEX  # the answer runs on to the cut


def test_template_that_rewrites_earlier_turns_is_refused(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] "
                               "+ '\n' }}{% endfor %}")
    encoder = ChatEncoder(tokenizer, max_length=64)
    with pytest.raises(ChatTemplateError, match="differently"):
        encoder.assistant_spans(with_default_system(conversations()[0]))


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (``▁`` prefixed to the first piece of a sequence), ChatML template."""
    from helpers import CHATML_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False)
    backend.train_from_iterator(QUESTIONS + ANSWERS + [DEFAULT_SYSTEM_PROMPT, "system user assistant"],
                                trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", unk_token="<unk>",
                                        pad_token="<unk>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
@pytest.mark.parametrize("max_length", [512, 100, 30])
def test_shared_system_block_is_tokenized_once_with_the_same_result(tiny_tokenizer, kind, max_length):
    tokenizer = tiny_tokenizer if kind == "byte_level" else metaspace_tokenizer()
    chats = [with_default_system([m for m in chat if m["role"] != "system"]) for chat in conversations()]
    shared = ChatEncoder(tokenizer, max_length)
    whole = ChatEncoder(tokenizer, max_length)
    whole._cut_tokens = []  # whole-text tokenization, the reference
    ours, reference = shared.encode_batch({"messages": chats}), whole.encode_batch({"messages": chats})
    assert ours == reference
    assert max(reference["length"]) <= max_length
    assert (max(reference["length"]) == max_length) == (max_length < 512)  # truncation happened, or not
    (head, head_ids), = shared._head_cache.items()
    if max_length == 30:
        assert head_ids is None  # the system block alone is longer than max_length: nothing to reuse
    elif kind == "byte_level":
        # The cut is after the system block and the first user turn's start token.
        assert head == f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>"
        assert len(head_ids) > 10
    else:
        # The rest of a conversation would start with a "▁" of its own: the check turns the cut off.
        assert head_ids is None
