"""Chat decoding options (sampling, seed, repetition), Ctrl-C during an answer, /reset."""

from __future__ import annotations

import io
import sys
import threading

import pytest
import torch
from helpers import TINY_NF4, sampled_fit

from finsight.inference.decoding import ChatSession, chat_generation_config
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


def test_chat_options_reach_generate(tiny_model_dir, tmp_path_factory, capsys, monkeypatch):
    from transformers import LlamaForCausalLM

    from finsight.cli.lightning_cli import main
    from finsight.model.precision import choose_precision

    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    seen = []
    original = LlamaForCausalLM.generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs["generation_config"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording)
    assert main(["chat", "--adapter", str(run["adapter"]), "--prompt", QUESTION, "--max_new_tokens", "4",
                 "--temperature", "0.5", "--top_p", "0.8", "--repetition_penalty", "1.3",
                 "--no_repeat_ngram_size", "3", "--prompt_lookup_tokens", "5", "--seed", "11"]) == 0
    config = seen[-1]
    assert (config.do_sample, config.temperature, config.top_p) == (True, 0.5, 0.8)
    assert (config.repetition_penalty, config.no_repeat_ngram_size, config.max_new_tokens) == (1.3, 3, 4)
    assert config.prompt_lookup_num_tokens == 5
    captured = capsys.readouterr()
    # The default compute dtype follows the CPU (bfloat16 where it is native), as training's does.
    dtype = choose_precision().compute_dtype
    assert captured.err.count(f"Generation model: NF4 weights dequantized to {dtype} with the adapter merged") == 1
    # The documented defaults: sampling at 0.7 from the 0.9 nucleus, repetitions penalised by 1.1.
    assert main(["chat", "--adapter", str(run["adapter"]), "--prompt", QUESTION, "--max_new_tokens", "2"]) == 0
    assert (seen[-1].do_sample, seen[-1].temperature, seen[-1].top_p, seen[-1].repetition_penalty) == (
        True, 0.7, 0.9, 1.1)
    assert seen[-1].prompt_lookup_num_tokens is None  # prompt lookup is off unless asked for


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
