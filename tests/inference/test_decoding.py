"""Generating answers: stop tokens, batched greedy generation, decoding options (sampling, seed, repetition,
prompt lookup), the chat session (history within max_length, Ctrl-C during an answer, /reset)."""

from __future__ import annotations

import io
import sys
import threading

import pytest
import torch
from helpers import TINY_NF4, chat_prompt_ids

from finsight.inference.decoding import (
    ChatSession,
    PromptTooLongError,
    chat_generation_config,
    generate,
    generation_mode,
    stop_token_ids,
)
from finsight.inference.merge import build_generation_model

QUESTION = "What is an expense ratio?"


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir):
    """The tiny model as the chat runs it (dequantized, merged), with a non-zero adapter."""
    from finsight.model.loading import load_peft_model, load_tokenizer
    from finsight.model.settings import LoraSettings, MemorySettings

    # PEFT draws LoRA A from the global generator: seeded, the model (and so its greedy answer) does not
    # depend on which tests ran before.
    torch.manual_seed(0)
    loaded = load_peft_model(str(tiny_model_dir), TINY_NF4, LoraSettings(r=8, alpha=16, dropout=0.0),
                             MemorySettings(gradient_checkpointing=False))
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    return build_generation_model(loaded.model, torch.float32), load_tokenizer(str(tiny_model_dir))


def _answer(chat_model, seed: int | None, **options) -> list[int]:
    model, tokenizer = chat_model
    decoding = chat_generation_config(**{"temperature": 1.0, **options})
    session = ChatSession(model, tokenizer, max_new_tokens=12, decoding=decoding, seed=seed)
    return session.ask(QUESTION).token_ids


def test_the_same_seed_gives_the_same_answer(chat_model):
    first = _answer(chat_model, seed=7)
    assert _answer(chat_model, seed=7) == first
    assert _answer(chat_model, seed=8) != first  # sampling does sample
    # Without a seed, every answer draws its own.
    assert _answer(chat_model, seed=None) != _answer(chat_model, seed=None)
    # A seeded conversation is reproducible turn by turn, and its turns are not copies of each other.
    model, tokenizer = chat_model
    turns = []
    for _ in range(2):
        session = ChatSession(model, tokenizer, max_new_tokens=12, decoding=chat_generation_config(1.0), seed=7)
        turns.append([session.ask(QUESTION).token_ids, session.ask(QUESTION).token_ids])
    assert turns[0] == turns[1] and turns[0][0] != turns[0][1]


def test_no_repeat_ngram_size_blocks_repeats(chat_model):
    greedy = _answer(chat_model, seed=0, temperature=0, repetition_penalty=1.0)
    assert len(set(greedy)) < len(greedy)  # the random model loops when decoding greedily
    blocked = _answer(chat_model, seed=0, temperature=0, repetition_penalty=1.0, no_repeat_ngram_size=1)
    assert len(set(blocked)) == len(blocked) == 12




class InterruptingStream(io.StringIO):
    """Raises KeyboardInterrupt at the first streamed text, as Ctrl-C in a terminal would."""

    def write(self, text: str) -> int:
        if text.strip() and not getattr(self, "interrupted", False):
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_not_the_session(chat_model):
    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, max_length=1024, max_new_tokens=600)
    answer = session.ask(QUESTION, stream=InterruptingStream())
    assert answer.interrupted and not answer.stopped
    assert 0 < len(answer.token_ids) < 600  # stopped at the next token, long before the limit
    assert not [t for t in threading.enumerate() if t.name == "finsight-chat-generate"]
    assert session.history[-1] == {"role": "assistant", "content": answer.text}
    session.max_new_tokens = 5
    follow_up = session.ask("And a bond?", stream=io.StringIO())
    assert not follow_up.interrupted and len(follow_up.token_ids) == 5


def test_reset_clears_the_history(chat_model, monkeypatch):
    from finsight.cli.chat import _interactive

    model, tokenizer = chat_model
    session = ChatSession(model, tokenizer, max_new_tokens=3)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\nWhat is a bond?\n/reset\n"))
    seen = []
    original = session.reset
    monkeypatch.setattr(session, "reset", lambda: (seen.append(len(session.history)), original()))
    output = io.StringIO()
    assert _interactive(session, "tiny", output) == 0
    assert seen == [4] and session.history == []
    assert "(conversation cleared)" in output.getvalue()


def test_prompt_lookup_gives_the_greedy_tokens_in_fewer_steps(chat_model):
    from helpers import PROMPTS

    model, tokenizer = chat_model
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        for question in PROMPTS:
            answers = {}
            for lookup in (0, 3):
                decoding = chat_generation_config(temperature=0, repetition_penalty=1.0, prompt_lookup_tokens=lookup)
                session = ChatSession(model, tokenizer, max_new_tokens=24, decoding=decoding, seed=0)
                session.stop_ids = [-1]  # every answer runs the full length
                calls.clear()
                answers[lookup] = (session.ask(question).token_ids, len(calls))
            assert answers[3][0] == answers[0][0]
            assert answers[0][1] == 24
        # The random model loops when greedy, so proposals from its own earlier words get accepted:
        # the last answer took fewer forward passes than tokens.
        assert answers[3][1] < 24
    finally:
        hook.remove()
    # Sampling with lookup stays reproducible by seed.
    assert _answer(chat_model, seed=3, prompt_lookup_tokens=3) == _answer(chat_model, seed=3, prompt_lookup_tokens=3)


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from finsight.model.loading import load_peft_model, load_tokenizer
    from finsight.model.settings import LoraSettings, MemorySettings

    loaded = load_peft_model(str(tiny_model_dir), TINY_NF4, LoraSettings(r=8, alpha=16, dropout=0.1),
                             MemorySettings(gradient_checkpointing=True))
    return loaded.model, load_tokenizer(str(tiny_model_dir))


def test_stop_tokens_come_from_the_chat_template(peft_model):
    model, tokenizer = peft_model
    assert stop_token_ids(tokenizer, model) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_generation_mode_restores_modes_cache_flag_and_rng(peft_model):
    model, _ = peft_model
    model.train()
    lora_dropout = next(m for n, m in model.named_modules() if n.endswith("lora_dropout.default"))
    model.base_model.model.lm_head.eval()  # a submodule Lightning would keep in eval mode
    modes = {name: m.training for name, m in model.named_modules()}
    checkpointing = [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]
    rng = torch.get_rng_state()
    with generation_mode(model):
        assert not model.training and not lora_dropout.training
        torch.rand(100)  # anything drawn in here must not shift what training draws afterwards
        model.config.use_cache = True
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.config.use_cache is False
    assert [layer.gradient_checkpointing for layer in model.base_model.model.model.layers] == checkpointing == [True] * 2


def test_batched_left_padded_generation_matches_one_by_one_and_stops(peft_model):
    model, tokenizer = peft_model
    prompts = [chat_prompt_ids(tokenizer, q) for q in ("What is an expense ratio?", "Hi",
                                              "Explain compound interest with an example, please.")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch needs padding
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) == 8 and not g.stopped for g in batched)  # the random model never says <|im_end|>
    # Declaring the third generated token a stop token ends that answer there, and marks it stopped.
    stop = batched[0].token_ids[2]
    first = batched[0].token_ids.index(stop)
    stopped = generate(model, tokenizer, prompts[:1], max_new_tokens=8, stop_ids=[stop])[0]
    assert stopped.stopped and stopped.token_ids == batched[0].token_ids[: first + 1]
    assert stopped.text == tokenizer.decode(batched[0].token_ids[:first], skip_special_tokens=True).strip()


def test_chat_session_drops_the_oldest_exchanges_and_keeps_the_system_prompt(peft_model):
    model, tokenizer = peft_model
    session = ChatSession(model, tokenizer, system_prompt="You are FinSight.", max_length=120, max_new_tokens=8)
    questions = ["What is an expense ratio?", "What is a bond?", "Explain dividends.", "What is an ETF?"]
    for question in questions:
        streamed = io.StringIO()
        answer = session.ask(question, stream=streamed)
        assert streamed.getvalue().strip() == answer.text  # the streamed text is the answer
        ids = session.prompt_ids("next")
        assert len(ids) + session.max_new_tokens <= session.max_length
    assert session.dropped_exchanges > 0
    kept = [m["content"] for m in session.history if m["role"] == "user"]
    assert kept == questions[len(questions) - len(kept):]  # the most recent exchanges survive, in order
    assert session.messages("x")[0] == {"role": "system", "content": "You are FinSight."}
    with pytest.raises(PromptTooLongError, match="at most 112 fit"):
        session.prompt_ids("word " * 200)
    with pytest.raises(ValueError, match="smaller than max_length"):
        ChatSession(model, tokenizer, max_length=8, max_new_tokens=8)
