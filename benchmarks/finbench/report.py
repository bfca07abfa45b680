"""The comparison's report: medians over repeats, finsight's advantage against each target, loss parity, the
machine and versions, and the Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

from finbench.harness import RSS_PHASES, STACKS, TRL_PRESETS, Settings


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
        f"precision {report.get('precision', '32-true')} (TRL as a user runs it: its bf16 default); "
        f"gradient checkpointing {checkpointing_text(s['gradient_checkpointing'])}; "
        f"finsight release_freed_memory {str(s.get('release_freed_memory', 'auto')).lower()}, "
        f"activation_budget_gib {s.get('activation_budget_gib')}; "
        f"finsight length-grouped batches (pad to ×8), "
        f"TRL `train_sampling_strategy={s['trl_sampling']!r}` (pad to longest).", "",
    ]
    user = any("trl_user" in metric for metric in report["metrics"].values())
    if user:
        lines += ["TRL tuned: every option set to finsight's choice (float32 adapters, finsight's precision and "
                  "compute dtype, non-reentrant "
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
    from finsight import compat

    native_bf16, instructions = compat.torch.cpu_has_native_bf16()  # the code path bitsandbytes and torch take
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    description = f"{cores} CPU cores ({cpu}, {instructions}), " + (f"GPU {gpu}" if gpu else "no GPU")
    return {"cpu": cpu, "instructions": instructions, "native_bf16": native_bf16, "cores": cores, "gpu": gpu,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "description": description}


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


