"""TRL's side of the comparison: finsight's conversations exported for TRL, ``SFTConfig`` presets, an
``SFTTrainer`` that times its data preparation, and TRL's data preparation and training runs."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from finbench import harness
from finbench.harness import IGNORE_INDEX, TRL_PRESETS, Settings, StepProbe


def export_trl_dataset(sources: list[dict], seed: int, out: Path, masking: str, val_fraction: float = 0.05,
                       val_max_rows: int = 200) -> int:
    """Write finsight's training conversations, in finsight's training order, as TRL dataset rows.

    ``masking="assistant"`` writes ``{"messages": [...]}`` rows, ``"completion"`` prompt-completion rows.

    The conversations come from the data module's own reading step (``FinSightDataModule._read``: read,
    check, sample with a per-source stream, split by answer groups), in the order the training split is
    stored in, so the two stacks train on the same conversations by construction rather than through a copy
    of finsight's logic that can drift from it; the parity run verifies it token by token.
    """
    import numpy as np

    from finsight.data.datamodule import FinSightDataModule

    dm = FinSightDataModule(sources=sources, seed=seed, val_fraction=val_fraction, val_max_rows=val_max_rows)
    _, rows = dm._read()
    train = rows["train"]["messages"]
    order = np.random.default_rng(seed).permutation(len(train))  # the seeded order ``_tokenize`` stores them in
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for index in order:
            messages = train[index]
            if masking == "assistant":
                row = {"messages": messages}
            elif messages[-1]["role"] != "assistant" or sum(m["role"] == "assistant" for m in messages) != 1:
                raise ValueError(f"conversation {index} is not single-turn; the prompt-completion format needs "
                                 "exactly one answer, at the end (use --trl-masking assistant)")
            else:
                row = {"prompt": messages[:-1], "completion": messages[-1:]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(train)


CHATML_MESSAGE = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
CHATML_MARKED = (
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + CHATML_MESSAGE + "{% endif %}"
)


def training_chat_template(tokenizer, probe: list[list[dict]]) -> str:
    """The tokenizer's ChatML template with ``{% generation %}`` around each answer and its ``<|im_end|>``.

    What TRL asks for when a template has no markers (``chat_template_path``). The marked copy must render
    the probe conversations exactly as the original does, with and without the generation prompt.
    """
    template = tokenizer.chat_template
    if not isinstance(template, str) or template.count(CHATML_MESSAGE) != 1:
        raise SystemExit("--trl-masking assistant needs a ChatML template ('<|im_start|>' + role ... "
                         "'<|im_end|>'); this tokenizer's template differs: use --trl-masking completion")
    marked = template.replace(CHATML_MESSAGE, CHATML_MARKED)
    for messages in probe:
        for prompt in (messages, messages[:-1]):
            for generation_prompt in (False, True):
                ours = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=generation_prompt)
                theirs = tokenizer.apply_chat_template(prompt, tokenize=False, chat_template=marked,
                                                       add_generation_prompt=generation_prompt)
                if ours != theirs:
                    raise SystemExit("the generation-marked template renders differently from the original")
    return marked


def trl_config(settings: Settings, output_dir: Path, *, steps: int, parity: bool, save: bool,
               preset: str = "tuned") -> Any:
    """``SFTConfig`` with every option that matters set explicitly (TRL's defaults differ from finsight's)."""
    from trl import SFTConfig

    if preset == "user":
        return trl_user_config(settings, output_dir, steps=steps, save=save)
    return SFTConfig(
        output_dir=str(output_dir), max_steps=steps, num_train_epochs=1,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.accumulate,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
        lr_scheduler_type="linear", warmup_steps=math.ceil(steps * settings.warmup_ratio),
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        bf16=settings.trainer_precision == "bf16-mixed", fp16=settings.trainer_precision == "16-mixed",
        use_cpu=not settings.cuda,
        gradient_checkpointing=settings.gradient_checkpointing is not False,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        # --packing: TRL's own packing (best-fit decreasing into rows of max_length, padding-free, position_ids).
        max_length=settings.max_length, truncation_mode="keep_start", packing=settings.packing,
        packing_strategy="bfd", padding_free=settings.packing,
        pad_to_multiple_of=None, loss_type="nll",
        completion_only_loss=settings.trl_masking == "completion",
        assistant_only_loss=settings.trl_masking == "assistant",
        chat_template_path=settings.trl_chat_template or None,
        shuffle_dataset=False, train_sampling_strategy="sequential" if parity else settings.trl_sampling,
        dataset_num_proc=settings.trl_num_proc, dataloader_num_workers=0, dataloader_pin_memory=settings.cuda,
        logging_strategy="steps", logging_steps=1, report_to="none", disable_tqdm=True,
        save_strategy="steps" if save else "no", save_steps=steps, eval_strategy="no",
        seed=settings.seed, data_seed=settings.seed, activation_offloading=False,
    )


def trl_user_config(settings: Settings, output_dir: Path, *, steps: int, save: bool) -> Any:
    """TRL as a user runs it: ``SFTConfig``'s defaults plus the methodology's values, nothing tuned.

    Set: what the methodology fixes (batch, accumulation, max length, learning rate, weight decay, warmup,
    gradient clipping, steps, seed), the assistant-only loss (the same route as the tuned preset, so both
    train the same tokens), CPU or not, and what the benchmark needs (no reporting, a checkpoint after the
    last step). Left at TRL's defaults, unlike the tuned preset: ``bf16=True`` (autocast to bfloat16, also
    on a CPU), the QLoRA adapters in bfloat16 (TRL's conversion, not undone), ``optim="adamw_torch_fused"``,
    the gradient checkpointing kwargs (transformers' default: reentrant), ``dataset_num_proc=None`` (one
    process), ``dataloader_pin_memory``, ``logging_steps``.
    """
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.accumulate, learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay, warmup_steps=math.ceil(steps * settings.warmup_ratio),
        max_grad_norm=1.0, use_cpu=not settings.cuda, max_length=settings.max_length,
        gradient_checkpointing=settings.gradient_checkpointing is not False,
        completion_only_loss=True if settings.trl_masking == "completion" else None,
        assistant_only_loss=settings.trl_masking == "assistant",
        chat_template_path=settings.trl_chat_template or None,
        train_sampling_strategy=settings.trl_sampling,
        report_to="none", disable_tqdm=True, save_strategy="steps" if save else "no", save_steps=steps,
        seed=settings.seed,
    )


def trl_trainer_class() -> type:
    """``SFTTrainer`` that times its dataset preparation and counts the tokens of each training step."""
    from trl import SFTTrainer

    class BenchSFTTrainer(SFTTrainer):
        """``SFTTrainer`` with its data preparation timed and each micro-batch counted by the step probe."""

        prepare_seconds = 0.0
        probe: StepProbe | None = None

        def _prepare_dataset(self, *args, **kwargs):
            started = time.perf_counter()
            dataset = super()._prepare_dataset(*args, **kwargs)
            self.prepare_seconds += time.perf_counter() - started
            return dataset

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.probe is not None:
                self.probe.batch(inputs)
            with profiled_step(len(self.probe.micro) if self.probe is not None else 0):
                loss = super().training_step(model, inputs, num_items_in_batch)
            self.last_loss = float(loss)
            return loss

    return BenchSFTTrainer


def trl_prepare(settings: Settings, spec: dict) -> dict:
    """Cold and cached TRL preparation: ``load_dataset`` of the JSON lines plus ``SFTTrainer``'s tokenization.

    Only the dataset work is timed (``_prepare_dataset``), not the rest of the trainer's construction; a
    throwaway one-layer model hosts the trainer.
    """
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    datasets.disable_progress_bars()
    preset = trl_preset(spec["stack"])
    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    trainer_cls = trl_trainer_class()
    result: dict[str, Any] = {}
    for phase in ("cold", "cached"):
        host = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        started = time.perf_counter()
        dataset = datasets.load_dataset("json", data_files=spec["trl_data"], split="train")
        load_s = time.perf_counter() - started
        trainer = trainer_cls(model=host, args=trl_config(settings, Path(spec["run_dir"]) / phase, steps=1,
                                                          parity=False, save=False, preset=preset),
                              train_dataset=dataset, processing_class=tokenizer)
        result[f"{phase}_s"] = load_s + trainer.prepare_seconds
        result[f"{phase}_load_s"] = load_s
    prepared = trainer.train_dataset
    result["train_samples"] = len(prepared)
    result["lengths"] = [len(ids) for ids in prepared["input_ids"][:]]
    result["trained"] = [sum(t != IGNORE_INDEX for t in lab) for lab in prepared["labels"][:]]
    result["peak_rss_mb"] = harness.peak_rss_mb()
    return result


def trl_train(settings: Settings, spec: dict) -> dict:
    """Train with TRL's SFTTrainer (QLoRA: the same 4-bit base and LoRA), saving its checkpoint at the end."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback

    datasets.disable_progress_bars()
    parity = spec["kind"] == "parity"
    preset = trl_preset(spec["stack"])
    steps = settings.parity_steps if parity else settings.steps
    run_dir = Path(spec["run_dir"])
    probe = StepProbe(settings.accumulate, settings.cuda, settings.seed if parity else None)
    timings: dict[str, float] = {}

    harness.mark_phase("loading")
    dtype = getattr(torch, settings.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        settings.model_dir, dtype=dtype, attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
        device_map={"": torch.cuda.current_device()} if settings.cuda else None,
    )
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    dataset = datasets.load_dataset("json", data_files=spec["trl_data"], split="train")
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                      lora_dropout=0.0 if parity else settings.lora_dropout,
                      target_modules=list(settings.target_modules), task_type="CAUSAL_LM")

    class Probe(TrainerCallback):
        """transformers' hooks: the step's end time and loss, and the checkpoint written after the last step."""

        def on_train_begin(self, args, state, control, **kwargs):
            probe.start(trainer.model)
            harness.mark_phase("first step")

        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end(trainer.last_loss)
            timings["last_step_end"] = time.perf_counter()
            # The checkpoint is written right after the last step's on_step_end.
            harness.mark_phase("checkpoint" if state.global_step >= steps else "later steps")

        def on_save(self, args, state, control, **kwargs):
            timings["checkpoint_s"] = time.perf_counter() - timings["last_step_end"]

    trainer = trl_trainer_class()(model=model, args=trl_config(settings, run_dir / "trl", steps=steps, parity=parity,
                                                                save=not parity, preset=preset),
                                  train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                                  callbacks=[Probe()])
    trainer.probe = probe
    if preset == "tuned":
        # TRL stores QLoRA adapters in bf16; finsight keeps them in float32. Same precision for both here.
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    started = time.perf_counter()
    trainer.train()
    fit_s = time.perf_counter() - started
    probe.finish()
    result = harness.finish_run(settings, probe, fit_s)
    result["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if not parity:
        harness.mark_phase("adapter export")
        folder = run_dir / "trl" / f"checkpoint-{steps}"
        result["checkpoint_s"] = timings.get("checkpoint_s")
        result["checkpoint_bytes"], result["checkpoint_files"] = harness.folder_size(folder)
        result["checkpoint_has_optimizer"] = (folder / "optimizer.pt").is_file()
        result["checkpoint_has_scheduler"] = (folder / "scheduler.pt").is_file()
        result.update(harness.export_adapter(trainer.model, run_dir / "adapter"))
    result["peak_rss_mb"] = harness.peak_rss_mb()
    return result


# "<micro-batch number>:<file>": torch.profiler over that micro-batch of each TRL run; "{stack}" in the file
# name becomes the stack and task (trl-train, trl-user-train).
PROFILE_ENV = "FINSIGHT_COMPARE_PROFILE"


def profiled_step(micro_batch: int) -> Any:
    """A ``torch.profiler`` context around TRL's training step when ``FINSIGHT_COMPARE_PROFILE`` names this
    micro-batch (counted from 1); its operator table (by self CPU time) goes to the named file."""
    import contextlib

    import torch

    wanted, _, path = os.environ.get(PROFILE_ENV, "").partition(":")
    if not wanted.isdigit() or int(wanted) != micro_batch:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def profiled():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            yield
        Path(path).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    return profiled()


def trl_preset(stack: str) -> str:
    """The TRL preset a stack name stands for (``trl``: tuned, ``trl-user``: as a user runs it)."""
    return {name: preset for preset, name in TRL_PRESETS.items()}[stack]


def compare_prepared_samples(finsight_prepared: str, trl_data: str, settings: Settings) -> dict[str, Any]:
    """Sample-by-sample comparison of finsight's prepared training split with TRL's prepared dataset."""
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ours = datasets.load_from_disk(finsight_prepared)
    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    host = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    trainer = trl_trainer_class()(model=host, args=trl_config(settings, Path(tempfile.mkdtemp()), steps=1,
                                                              parity=True, save=False),
                                  train_dataset=datasets.load_dataset("json", data_files=trl_data, split="train"),
                                  processing_class=tokenizer)
    theirs = trainer.train_dataset
    a_ids, a_labels = ours["input_ids"][:], ours["labels"][:]
    b_ids, b_labels = theirs["input_ids"][:], theirs["labels"][:]
    n = min(len(a_ids), len(b_ids))
    same_ids = sum(a_ids[i] == b_ids[i] for i in range(n))
    same_labels = sum(a_labels[i] == b_labels[i] for i in range(n))
    first_diff = next((i for i in range(n) if a_ids[i] != b_ids[i] or a_labels[i] != b_labels[i]), None)
    return {"finsight": len(a_ids), "trl": len(b_ids), "identical_input_ids": same_ids,
            "identical_labels": same_labels, "first_difference": first_diff}


