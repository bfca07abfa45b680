"""finsight with gradient checkpointing on and with ``auto``, side by side on the same batches.

    python benchmarks/checkpointing.py --model smollm2-135m --max-length 256 --steps 4 --warmup-steps 1

Takes ``compare.py``'s options (model, rows, steps, batch size, length, repeats, ...). Both variants train
the same length-grouped batches in the same order from the same prepared data, each in a fresh
subprocess, alternating (on, auto, on, auto with ``--repeats 2``); the table gives the medians and the
decision ``auto`` made with its reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from finbench.cli import parse_args, settings_from
from finbench.harness import Runner, build_model_dir, synthetic_mixture
from finbench.report import fmt

VARIANTS = {"on": True, "auto": "auto"}
ROWS = [("trained tokens/s (median step)", "trained_tokens_per_s", 1), ("non-pad tokens/s", "tokens_per_s", 1),
        ("median optimizer step (s)", "median_step_s", 2), ("median step, CPU time (s)", "median_step_cpu_s", 2),
        ("peak RSS, training process (MiB)", "peak_rss_mb", 0)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both variants and print the table (Markdown)."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    settings = settings_from(args)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="finsight-checkpointing-"))
    work.mkdir(parents=True, exist_ok=True)
    sources = synthetic_mixture(work, settings.rows)
    settings.model_dir = str(build_model_dir(settings.model, work / "model", args.tokenizer))
    runner = Runner(settings, work, args.threads, args.verbose)
    cache = work / "cache" / "finsight"
    spec = {"env": {"HF_DATASETS_CACHE": str(cache / "hf")}, "sources": sources, "cache_dir": str(cache / "finsight")}
    runner("prep", "finsight", **spec)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(settings.repeats):
        for name, value in VARIANTS.items():
            runner.settings = dataclasses.replace(settings, gradient_checkpointing=value)
            runs[name].append(runner("train", "finsight", **spec))
    lines = [f"finsight, {settings.model}: batch {settings.batch_size}, max length {settings.max_length}, "
             f"{settings.steps} steps (median over steps {settings.warmup_steps + 1}–{settings.steps}), "
             f"{settings.repeats} repeat(s), load average at start {runs['on'][0]['load_average']['start']}", "",
             "| | checkpointing on | auto |", "|---|---:|---:|"]
    for name, key, digits in ROWS:
        cells = [fmt(statistics.median(r[key] for r in runs[v]), digits) for v in VARIANTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    decisions = [" ".join(map(str, runs[v][0]["gradient_checkpointing"])) for v in VARIANTS]
    lines.append("| decision | " + " | ".join(d.replace("|", "/") for d in decisions) + " |")
    text = "\n".join(lines)
    print(text)
    report = {"settings": dataclasses.asdict(settings), "runs": runs, "markdown": text}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
