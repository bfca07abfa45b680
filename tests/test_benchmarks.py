"""benchmarks/compare.py (the ``finbench`` package): the FLOP count, the TRL data set-up that must mask exactly
like finsight, the report, and (slow) the whole comparison at tiny size on CPU; benchmarks/fit_cache.py at tiny
size."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from finbench import cli, finsight_runner, flops, harness, report, trl_runner
from finbench.synthetic import write_synthetic
from helpers import ROOT

from finsight.data.chat import IGNORE_INDEX, ChatEncoder


def test_lightnings_flop_count_gives_every_matmul_of_a_lora_training_pass():
    """Lightning's ``measure_flops`` on the meta device, solved per token and per squared sample length,
    equals the count by hand: the frozen base 4 FLOPs per weight and token (forward, input gradient), LoRA 6,
    attention 12 · layers · heads · head_dim per squared length, less the input gradients of the first
    layer's q, k and v (base and LoRA A), which autograd never computes (the embeddings are frozen)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**harness.TINY_SHAPE, "vocab_size": 1000, "num_hidden_layers": 3})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    h, kv, r = 128, 2 * 32, 8  # hidden size, key/value width (2 heads of 32), LoRA rank
    lora = 3 * r * ((h + h) + (h + kv) + (h + kv))  # q, k and v in 3 layers: r × (in + out) each
    first_layer_input_grads = 2 * (h * (h + kv + kv) + 3 * r * h)
    coefficients = flops.flop_coefficients(config, lora_r=r, target_modules=("q_proj", "k_proj", "v_proj"))
    assert coefficients["per_token"] == 4 * linear + 6 * lora - first_layer_input_grads
    assert coefficients["per_squared_length"] == 12 * 3 * 4 * 32
    # A step of 1000 tokens in 4 samples of 250.
    assert flops.step_flops(coefficients, 1000, 4 * 250**2) == pytest.approx(
        coefficients["per_token"] * 1000 + 12 * 3 * 4 * 32 * 4 * 250**2)


def test_marked_template_renders_the_same_text_and_masks_like_finsight(tiny_tokenizer):
    conversations = [
        [{"role": "system", "content": "You are FinSight."}, {"role": "user", "content": "What is an ETF?"},
         {"role": "assistant", "content": "A fund that trades on an exchange like a stock."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
         {"role": "user", "content": "Define APR."}, {"role": "assistant", "content": "The annual percentage rate."}],
    ]
    marked = trl_runner.training_chat_template(tiny_tokenizer, conversations)
    assert "{% generation %}" in marked
    encoder = ChatEncoder(tiny_tokenizer, max_length=512)
    ours = encoder.encode_batch({"messages": conversations})
    for index, messages in enumerate(conversations):
        theirs = tiny_tokenizer.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
        assert theirs["input_ids"] == ours["input_ids"][index]
        trained = [label != IGNORE_INDEX for label in ours["labels"][index]]
        assert [bool(m) for m in theirs["assistant_masks"]] == trained
        assert sum(trained) > 0


def test_a_template_that_is_not_chatml_is_refused_with_the_alternative(tiny_tokenizer):
    import copy

    other = copy.deepcopy(tiny_tokenizer)  # the session fixture stays untouched
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(SystemExit, match="use --trl-masking completion"):
        trl_runner.training_chat_template(other, [[{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}]])


def test_trl_prepares_exactly_finsights_training_samples(tiny_tokenizer, tmp_path):
    """The exported conversations, prepared by TRL's own SFTTrainer, equal finsight's samples token by token."""
    pytest.importorskip("trl")
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = write_synthetic(tmp_path / "raw", 240, seed=3)
    sources = harness.finsight_sources(raw)
    model_dir = tmp_path / "model"
    tiny_tokenizer.save_pretrained(model_dir)
    settings = harness.Settings(model="tiny", model_dir=str(model_dir), max_length=256, num_proc=1)
    dm = finsight_runner.finsight_datamodule(settings, tiny_tokenizer, sources, str(tmp_path / "cache"), fixed_order=True)
    dm.prepare_data()
    dm.setup("fit")

    data = tmp_path / "trl.jsonl"
    assert trl_runner.export_trl_dataset(sources, settings.seed, data, "assistant") >= len(dm.train_dataset)
    template = tmp_path / "template.jinja"
    probe = [json.loads(line)["messages"] for line in data.read_text().splitlines()[:3]]
    template.write_text(trl_runner.training_chat_template(tiny_tokenizer, probe))
    settings.trl_chat_template = str(template)
    host = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    trainer = trl_runner.trl_trainer_class()(
        model=host, args=trl_runner.trl_config(settings, tmp_path / "trl", steps=1, parity=True, save=False),
        train_dataset=datasets.load_dataset("json", data_files=str(data), split="train",
                                            cache_dir=str(tmp_path / "hf")),
        processing_class=tiny_tokenizer)
    assert trainer.prepare_seconds > 0
    theirs = trainer.train_dataset
    assert len(theirs) == len(dm.train_dataset) > 100
    assert theirs["input_ids"][:] == dm.train_dataset["input_ids"][:]
    assert theirs["labels"][:] == dm.train_dataset["labels"][:]


def fake_runs(step_seconds: float, trained: int, real: int, padded: int, rss: float) -> dict:
    """One training result as the probe summarises it."""
    return {"trained_tokens_per_s": trained / step_seconds, "tokens_per_s": real / step_seconds,
            "median_step_s": step_seconds, "median_step_cpu_s": 2 * step_seconds,
            "trained_tokens_per_cpu_s": trained / (2 * step_seconds), "padding_efficiency": real / padded,
            "peak_rss_mb": rss, "checkpoint_s": 0.1, "checkpoint_bytes": 2**20, "adapter_s": 0.05,
            "adapter_bytes": 2**19, "cuda": None}


def test_summary_reports_finsights_advantage_against_each_target():
    settings = harness.Settings(model="tiny", batch_size=2)
    LENGTHS = [8, 512] * 200  # noqa: N806 - multiples of 8, so only the batch composition decides the padding
    prep = {"finsight": [{"cold_s": 10.0, "cached_s": 1.0, "peak_rss_mb": 500.0, "lengths": LENGTHS}],
            "trl": [{"cold_s": 30.0, "cached_s": 2.0, "peak_rss_mb": 400.0, "lengths": LENGTHS}]}
    train = {"finsight": [fake_runs(1.0, 130, 240, 250, 900.0), fake_runs(1.2, 130, 240, 250, 1100.0)],
             "trl": [fake_runs(1.0, 100, 200, 260, 1000.0)]}
    metrics = report.summarise(settings, prep, train)
    assert metrics["prep_cold_s"]["finsight_advantage"] == pytest.approx(3.0)
    assert metrics["prep_cold_s"]["met"] is True  # target: at least 2× faster
    assert metrics["prep_peak_rss_mb"]["finsight_advantage"] == pytest.approx(0.8)
    # Two finsight repeats: the median of 130/1.0 and 130/1.2 tokens/s.
    ours = (130 / 1.0 + 130 / 1.2) / 2
    assert metrics["trained_tokens_per_s"]["finsight"] == pytest.approx(ours)
    assert metrics["trained_tokens_per_s"]["met"] is (ours / 100 >= 1.3)
    assert metrics["peak_rss_mb"]["finsight"] == pytest.approx(1000.0)
    assert metrics["peak_rss_mb"]["met"] is True  # 1000 MiB against 1000 MiB: no higher
    # Whole-epoch padding from the lengths: TRL's random order pads more than finsight's grouped one.
    assert metrics["epoch_padding_efficiency"]["finsight"] > 0.95
    assert metrics["epoch_padding_efficiency"]["trl"] < 0.9
    assert "cuda_max_allocated_mb" not in metrics  # no CUDA numbers at all: no row


def test_both_trl_presets_are_reported_side_by_side_and_a_target_must_hold_against_each():
    settings = harness.Settings(model="tiny", batch_size=2, trl_presets=("tuned", "user"))
    prep = {stack: [{"cold_s": 10.0 * (i + 1), "cached_s": 1.0, "peak_rss_mb": 500.0}]
            for i, stack in enumerate(("finsight", "trl", "trl-user"))}
    train = {"finsight": [fake_runs(1.0, 130, 240, 250, 900.0)], "trl": [fake_runs(1.0, 110, 200, 260, 1000.0)],
             "trl-user": [fake_runs(1.0, 40, 200, 260, 800.0)]}
    metrics = report.summarise(settings, prep, train)
    tokens = metrics["trained_tokens_per_s"]
    assert tokens["trl_user"] == pytest.approx(40.0)
    assert tokens["finsight_advantage"] == pytest.approx(130 / 110)
    assert tokens["finsight_advantage_user"] == pytest.approx(130 / 40)
    assert tokens["met"] is False  # 3.25x the user preset, but only 1.18x the tuned one
    rss = metrics["peak_rss_mb"]
    assert rss["finsight_advantage"] == pytest.approx(1000 / 900) and rss["met"] is False  # user preset: 800 MiB
    text = report.markdown({"settings": dataclasses.asdict(settings), "versions": {"trl": "1.x"},
                             "machine": {"description": "2 CPU cores, no GPU"}, "train_samples": 10,
                             "warmup_schedule_steps": 1, "metrics": metrics, "parity": None})
    assert "| metric | finsight | TRL tuned | finsight advantage | TRL as a user runs it |" in text
    assert "| trained tokens/s (median step) (tok/s) | 130.0 | 110.0 | 1.18× | 40.0 | 3.25× | ≥ 1.3× | **no** |" in text


def test_the_user_preset_keeps_trls_defaults_and_sets_the_methodologys_values(tmp_path):
    pytest.importorskip("trl")
    # float32 for the tuned preset on every CPU kind (auto would pick bf16 on one with AVX512-BF16 or AMX).
    settings = harness.Settings(model="tiny", batch_size=4, accumulate=2, max_length=256, learning_rate=6e-5,
                                warmup_ratio=0.03, precision="32-true")
    user = trl_runner.trl_config(settings, tmp_path, steps=100, parity=False, save=False, preset="user")
    tuned = trl_runner.trl_config(settings, tmp_path, steps=100, parity=False, save=False)
    for config in (user, tuned):
        assert (config.per_device_train_batch_size, config.gradient_accumulation_steps, config.max_length,
                config.learning_rate, config.warmup_steps, config.max_grad_norm) == (4, 2, 256, 6e-5, 3, 1.0)
        assert config.assistant_only_loss and config.gradient_checkpointing
    assert user.bf16 and not tuned.bf16  # TRL's default autocasts to bfloat16, also on a CPU
    assert (user.optim, tuned.optim) == ("adamw_torch_fused", "adamw_torch")
    assert user.dataset_num_proc is None and user.gradient_checkpointing_kwargs is None
    assert tuned.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_parity_report_flags_different_batches_and_losses():
    step = {"loss": 2.0, "digests": ["a"], "trained": 10}
    same = report.parity_report({"steps": [step], "lora_tensors_reset": 4},
                                 {"steps": [dict(step, loss=2.0005)], "lora_tensors_reset": 4}, cuda=False)
    assert same["agree"] and same["same_batches"] and same["max_rel_diff"] == pytest.approx(2.5e-4)
    other_batch = report.parity_report({"steps": [step], "lora_tensors_reset": 4},
                                        {"steps": [dict(step, digests=["b"])], "lora_tensors_reset": 4}, cuda=False)
    assert not other_batch["agree"] and not other_batch["same_batches"]
    far = report.parity_report({"steps": [step], "lora_tensors_reset": 4},
                                {"steps": [dict(step, loss=2.1)], "lora_tensors_reset": 4}, cuda=False)
    assert not far["agree"]
    text = report.markdown({"settings": {**dataclasses.asdict(harness.Settings(model="tiny"))},
                             "versions": {"trl": "1.x"}, "machine": {"description": "2 CPU cores, no GPU"},
                             "train_samples": 10, "warmup_schedule_steps": 1, "metrics": {}, "parity": far})
    assert "**differ**" in text and "| 1 | 2.000000 | 2.100000 |" in text


@pytest.mark.slow
def test_compare_runs_both_stacks_at_tiny_size_with_the_gpu_bookkeeping(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "report.json"
    report = cli.main([
        "--model", "tiny", "--tokenizer", str(tiny_model_dir), "--rows", "400", "--steps", "3",
        "--warmup-steps", "1", "--parity-steps", "2", "--gpu-bookkeeping", "--peak-tflops", "1",
        "--workdir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(tmp_path / "report.md"),
    ])
    saved = json.loads(out.read_text())
    assert saved["metrics"].keys() == report["metrics"].keys()
    metrics = saved["metrics"]
    assert saved["settings"]["max_length"] == 1024 and saved["settings"]["gpu_mode"]  # the GPU recipe
    for key in ("prep_cold_s", "prep_cached_s", "trained_tokens_per_s", "peak_rss_mb", "checkpoint_mb",
                "adapter_mb", "mfu", "mfu_trained_tokens"):
        assert metrics[key]["finsight"] > 0 and metrics[key]["trl"] > 0, key
    assert 0 < metrics["mfu_trained_tokens"]["finsight"] < metrics["mfu"]["finsight"] < 1
    assert metrics["padding_efficiency"]["finsight"] > 0.9
    # The same LoRA tensors in float32: the exported adapters are the same size.
    assert metrics["adapter_mb"]["finsight"] == pytest.approx(metrics["adapter_mb"]["trl"], rel=0.01)
    for stack in ("finsight", "trl"):
        run = saved["runs"]["train"][stack][0]
        assert run["checkpoint_has_optimizer"] and run["checkpoint_has_scheduler"]
        assert len(run["steps"]) == 3 and all(s["trained"] > 0 for s in run["steps"])
    parity = saved["parity"]
    assert parity["same_batches"] and parity["agree"], parity
    assert parity["samples"]["identical_labels"] == parity["samples"]["finsight"] == saved["train_samples"]
    assert "Loss parity" in (tmp_path / "report.md").read_text()


def test_the_fit_cache_benchmark_prints_the_save_against_both_first_chats(tiny_model_dir):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_cache.py"), "--model", str(tiny_model_dir),
                             "--repeats", "1"], capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{tiny_model_dir}, NF4, compute float32, CPU: ")
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and "(s)" not in line]
    assert rows == ["save at the end of fit", "first chat, nothing cached", "first chat, cached"]
    assert lines[-1].startswith("entry on disk: ") and "saves" in lines[-1]
