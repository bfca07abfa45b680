"""DeepSpeed ZeRO-2 + optimizer offload, ZeRO-3 + parameter offload, packed rows (``data.packing``) and
token-budget micro-batches (``data.batch_tokens``) against the plain strategy, side by side.

Each strategy is one ``python -m finsight fit`` run of the quickstart config (the bundled data), read back from
its TensorBoard events: trained tokens/s (median over steps), peak CUDA memory (or RSS on the CPU), the loss per
step, and the attention implementation from the start-up summary. Run through ``benchmarks/gpu_smoke.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finbench.harness import SMOLLM2 as QUICKSTART_MODEL

ROOT = Path(__file__).resolve().parents[1]


def build_model(config_folder: Path | None, target: Path, tiny: bool) -> Path:
    """SmolLM2-135M's architecture and tokenizer with seeded random weights (or a 2-layer version for --cpu)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if config_folder is None:
        from finsight.model.loading import resolve_model

        config_folder = Path(resolve_model(QUICKSTART_MODEL))
    config = AutoConfig.from_pretrained(config_folder)
    if tiny:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(config_folder).save_pretrained(target)
    return target


def fit(strategy: str, model: Path, out: Path, steps: int, cpu: bool) -> dict:
    """One training run; returns what its events and start-up summary say."""
    args = [sys.executable, "-m", "finsight", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml")]
    if strategy in ("deepspeed", "zero3"):
        args += ["--config", str(ROOT / "configs" / f"deepspeed_{'zero3' if strategy == 'zero3' else 'zero2'}_offload.yaml")]
    if strategy == "packed":  # the plain strategy, several conversations per row (flash-attention reads them)
        args += ["--data.packing=true"]
    if strategy == "budget":  # the plain strategy, micro-batches of 8 full-length rows' worth of tokens
        args += ["--data.batch_tokens=3072"]
    args += [f"--model.model_name={model}", f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1",
             f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=2",
             f"--trainer.logger.init_args.save_dir={out / 'logs'}", f"--trainer.logger.init_args.name={strategy}",
             "--trainer.enable_progress_bar=false"]
    if not cpu:
        args += ["--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed", "--model.compute_dtype=bfloat16"]
    start = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - start
    (out / f"{strategy}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{strategy} run failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sorted((out / "logs" / strategy).glob("version_*"))[-1]))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    memory_tag = "perf/rss_gb" if cpu else "perf/cuda_max_allocated_gb"
    attention = re.search(r"attention\s*│\s*([^│\n]+)", result.stdout + result.stderr)
    return {
        "strategy": strategy, "wall_s": round(wall, 1),
        "trained_tokens_per_s": statistics.median(v for _, v in scalars["perf/trained_tokens_per_s"]),
        "peak_memory_gb": max(v for _, v in scalars[memory_tag]), "memory": memory_tag,
        "loss": [round(v, 4) for _, v in scalars["train/loss"]],
        "grad_norm": [round(v, 4) for _, v in scalars["train/grad_norm"]],
        "attention": attention.group(1).strip() if attention else "?",
    }


NAMES = {"plain": "plain", "deepspeed": "DeepSpeed ZeRO-2 + offload", "zero3": "ZeRO-3 + parameter offload",
         "packed": "plain, packed rows", "budget": "plain, 3,072-token micro-batches"}


def table(rows: list[dict]) -> str:
    """The runs side by side: speed, memory, the loss and gradient norm of every step."""
    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [row("", [NAMES[r["strategy"]] for r in rows]), "|---|" + "---:|" * len(rows),
             row("trained tokens/s (median)", [f"{r['trained_tokens_per_s']:.0f}" for r in rows]),
             row(f"peak memory, GB ({rows[0]['memory']})", [f"{r['peak_memory_gb']:.2f}" for r in rows]),
             row("wall time of the run, s", [str(r["wall_s"]) for r in rows]),
             row("attention", [r["attention"] for r in rows])]
    lines += ["", row("step", [f"loss ({r['strategy']})" for r in rows] + [f"grad norm ({r['strategy']})" for r in rows]),
              "|---:|" + "---:|" * (2 * len(rows))]
    for step in range(min(len(r["loss"]) for r in rows)):
        lines.append(row(str(step + 1), [f"{r['loss'][step]:.4f}" for r in rows]
                         + [f"{r['grad_norm'][step]:.4f}" for r in rows]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-folder", type=Path, help="folder with config.json and the tokenizer")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU: checks the script itself")
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.cpu:
        import torch

        print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        model = build_model(args.config_folder, Path(scratch) / "model", tiny=args.cpu)
        rows = [fit(strategy, model, args.out, args.steps, args.cpu)
                for strategy in ("plain", "deepspeed", "zero3", "packed", "budget")]
    report = table(rows)
    print(report)
    (args.out / "gpu_smoke.md").write_text(report + "\n")
    (args.out / "gpu_smoke.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
