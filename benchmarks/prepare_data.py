"""How long ``FinSightDataModule`` takes to prepare the 20,000-conversation synthetic mixture.

Writes the synthetic Reddit and 10-K QA sources (``finbench.synthetic.write_synthetic``) to a temporary
folder and prepares them with a real-size tokenizer (SmolLM2's, 49k tokens), twice: cold (read, check,
tokenize, save) and cached (a second data module with the same config: fingerprint, load, report). The
one-off costs of a fresh process (importing ``datasets`` and finsight, loading the tokenizer) are timed
separately, since every run pays them whatever the data size.

    python benchmarks/prepare_data.py                       # SmolLM2 tokenizer from the finsight cache
    python benchmarks/prepare_data.py --tokenizer PATH      # any local tokenizer folder
    python benchmarks/prepare_data.py --num-proc 1 2        # compare tokenization processes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from finbench.harness import SMOLLM2, finsight_sources
from finbench.synthetic import write_synthetic


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (tokenization workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Seconds a call takes, and its result."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def timed_cpu(fn, *args, **kwargs) -> tuple[float, float, object]:
    """Wall and CPU seconds a call takes (CPU includes its worker processes), and its result."""
    cpu = cpu_seconds()
    wall, result = timed(fn, *args, **kwargs)
    return wall, cpu_seconds() - cpu, result


def prepare(sources: list[dict], tokenizer, num_proc: int, cache_dir: Path, max_length: int):
    """One data module doing what a training run does before its first step: prepare_data + setup."""
    from finsight import FinSightDataModule

    dm = FinSightDataModule(sources=sources, tokenizer=tokenizer, num_proc=num_proc, cache_dir=str(cache_dir),
                            max_length=max_length)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print (and return) its numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=20_000, help="size of the synthetic mixture")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[2], help="tokenization processes to try")
    parser.add_argument("--tokenizer", default=None,
                        help=f"tokenizer folder or model reference (default: {SMOLLM2}, converted once)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)

    results: dict = {"conversations": args.conversations}
    results["import_datasets_s"], _ = timed(__import__, "datasets")
    results["import_finsight_s"], _ = timed(__import__, "finsight.data.datamodule")
    import datasets

    from finsight.model.loading import load_tokenizer, resolve_model

    datasets.disable_progress_bars()
    results["resolve_model_s"], path = timed(resolve_model, args.tokenizer or SMOLLM2)
    results["load_tokenizer_s"], tokenizer = timed(load_tokenizer, path)
    results["tokenizer"] = str(path)
    results["vocab"] = len(tokenizer)

    work = Path(tempfile.mkdtemp(prefix="finsight-bench-"))
    try:
        results["write_synthetic_s"], files = timed(write_synthetic, work / "raw", args.conversations, seed=0)
        sources = finsight_sources(files)
        runs = []
        for num_proc in args.num_proc:
            cache = work / f"cache-{num_proc}"
            cold, cold_cpu, dm = timed_cpu(prepare, sources, tokenizer, num_proc, cache, args.max_length)
            cached, cached_cpu, again = timed_cpu(prepare, sources, tokenizer, num_proc, cache, args.max_length)
            assert dm.from_cache is False and again.from_cache is True
            report = dm.report
            runs.append({
                "num_proc": num_proc,
                "cold_s": round(cold, 2), "cold_conversations_per_s": round(args.conversations / cold),
                "cold_cpu_s": round(cold_cpu, 2),
                "cached_s": round(cached, 2), "cached_conversations_per_s": round(args.conversations / cached),
                "cached_cpu_s": round(cached_cpu, 2),
                "train": sum(s.train for s in report.sources), "val": sum(s.val for s in report.sources),
                "tokens": sum(s.tokens for s in report.sources),
                "padding_efficiency_grouped": report.padding_efficiency_grouped,
            })
        results["runs"] = runs
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    for key in ("import_datasets_s", "import_finsight_s", "resolve_model_s", "load_tokenizer_s", "write_synthetic_s"):
        results[key] = round(results[key], 2)
    print(f"one-off costs: import datasets {results['import_datasets_s']}s, import finsight "
          f"{results['import_finsight_s']}s (lightning, torch), resolve model {results['resolve_model_s']}s, "
          f"load tokenizer {results['load_tokenizer_s']}s (vocab {results['vocab']}); "
          f"load average {results['load_average']} on {os.cpu_count()} CPUs")
    for run in results["runs"]:
        print(f"num_proc={run['num_proc']}: cold {run['cold_s']}s ({run['cold_conversations_per_s']} conversations/s, "
              f"{run['cold_cpu_s']} CPU-s), cached {run['cached_s']}s ({run['cached_conversations_per_s']} "
              f"conversations/s, {run['cached_cpu_s']} CPU-s); "
              f"{run['train']} train + {run['val']} val samples, {run['tokens']} tokens, "
              f"padding efficiency {run['padding_efficiency_grouped']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
