"""Greedy generation, the training-time samples callback and the chat session, on the tiny 4-bit model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import TINY_NF4, chat_prompt_ids, sampled_fit

from finsight.evaluation.samples import DEFAULT_SAMPLE_PROMPTS
from finsight.inference.decoding import (
    ChatSession,
    PromptTooLongError,
    generate,
    generation_mode,
    stop_token_ids,
)

# ------------------------------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------------------------------ callback


def _event_accumulator(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_samples_are_logged_to_tensorboard_as_text_and_scalars(tiny_model_dir, tmp_path_factory):
    run = sampled_fit(tiny_model_dir, tmp_path_factory)
    accumulator = _event_accumulator(run["log_dir"])
    texts = accumulator.Tensors("samples/generations/text_summary")
    assert [event.step for event in texts] == [2]  # one validation, after optimizer step 2
    table = texts[0].tensor_proto.string_val[0].decode()
    assert "**step 2**" in table
    for prompt in (*DEFAULT_SAMPLE_PROMPTS, "Who are you?"):
        assert f"| {prompt} |" in table
    callback = run["callback"]
    for _, answer in callback.last_answers:
        assert answer.replace("|", "\\|").replace("\n", "<br>") in table
    scalars = accumulator.Tags()["scalars"]
    for name in ("distinct_2", "repetition_3", "mean_answer_words", "stopped_by_eos", "identity", "seconds"):
        assert f"samples/{name}" in scalars
    seconds = accumulator.Scalars("samples/seconds")[0].value
    assert 0 < seconds == pytest.approx(callback.last_metrics["seconds"], rel=1e-5)


def _plain_fit(model_dir: Path, root: Path, callbacks: list) -> dict[str, torch.Tensor]:
    """3 steps with dropout and a validation after step 2, on a bare Trainer: no callback reseeds the RNG
    per batch (the CLI's StepSeededRNG would hide a callback that draws from it)."""
    import lightning as L
    from helpers import sample_sources

    from finsight.data.datamodule import FinSightDataModule
    from finsight.training.module import FinSightModule

    L.seed_everything(7)
    module = FinSightModule(model_name=str(model_dir), compute_dtype="float32", lora_r=8, lora_dropout=0.1,
                            learning_rate=1e-2)
    # The quickstart's data settings: the prepared data is shared with the CLI runs through the cache.
    data = FinSightDataModule(sources=sample_sources(intro_rows=60), tokenizer=str(model_dir), max_length=512,
                              batch_size=2, num_proc=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, val_check_interval=2, limit_val_batches=2,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return {k: v.clone() for k, v in module.adapter_state_dict().items()}


def test_samples_callback_leaves_the_training_result_unchanged(tiny_model_dir, tmp_path):
    from finsight.evaluation.samples import GenerationSamples

    samples = GenerationSamples(max_new_tokens=4)
    with_samples = _plain_fit(tiny_model_dir, tmp_path / "with", [samples])
    assert samples.last_answers  # it did generate, after step 2, between training steps
    plain = _plain_fit(tiny_model_dir, tmp_path / "plain", [])
    assert with_samples.keys() == plain.keys() and len(plain) == 2 * 7 * 2  # lora_A and B of 14 layers
    assert all(torch.equal(with_samples[k], plain[k]) for k in plain)
    # The weights did move: the comparison is not between two untouched initialisations.
    assert all(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)
