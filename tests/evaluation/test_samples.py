"""The training-time samples callback: logged to TensorBoard, and the training result left unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import sampled_fit

from finsight.evaluation.samples import DEFAULT_SAMPLE_PROMPTS

# ------------------------------------------------------------------------------------------ helpers












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
