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
  adapters (finsight's choice). Both stacks run the precision ``--precision`` gives (``auto``: the
  hardware's, bf16-mixed on CPUs with AVX512-BF16 or AMX, 32-true on AVX2, where bf16 is emulated and slow).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from finbench import harness
from finbench.finsight_runner import finsight_prepare, finsight_train
from finbench.flops import DEFAULT_PEAK_TFLOPS, flop_coefficients, peak_flops
from finbench.harness import (
    MODELS,
    PRESETS,
    SMOLLM2,
    STACKS,
    TRL_PRESETS,
    Runner,
    Settings,
    build_model_dir,
    synthetic_mixture,
)
from finbench.report import machine, markdown, parity_report, summarise, versions
from finbench.trl_runner import (
    PROFILE_ENV,
    compare_prepared_samples,
    export_trl_dataset,
    training_chat_template,
    trl_prepare,
    trl_train,
)


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
    if PROFILE_ENV in os.environ:  # one profile file per stack: "{stack}" in the name
        os.environ[PROFILE_ENV] = os.environ[PROFILE_ENV].replace("{stack}", f"{spec['stack']}-{spec['kind']}")
    from memory_profile import RssSampler  # benchmarks/memory_profile.py, beside compare.py

    with RssSampler() as harness.RSS_SAMPLER:  # training runs mark their phases on it (harness.mark_phase)
        result = task(settings, spec)
    result["rss_phases"] = harness.RSS_SAMPLER.report()["phases"]
    if spec["kind"] == "parity" and spec["stack"] == "trl" and spec.get("finsight_prepared"):
        result["samples"] = compare_prepared_samples(spec["finsight_prepared"], spec["trl_data"], settings)
    result["load_average"] = {"start": spec["load_average"], "end": list(os.getloadavg())}
    Path(spec["out"]).write_text(json.dumps(result))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``checkpointing.py`` takes the same options)."""
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
    parser.add_argument("--precision", choices=("auto", "32-true", "bf16-mixed", "16-mixed"), default="auto",
                        help="finsight and TRL tuned; auto: what the hardware calls for (bf16-mixed on CPUs with "
                             "AVX512-BF16 or AMX and bf16 GPUs, 32-true on other CPUs). TRL as a user runs it "
                             "keeps its own default (bf16)")
    parser.add_argument("--release-freed-memory", choices=("true", "false", "auto"), default="auto",
                        help="finsight's release_freed_memory option (freed activations back to the OS: lower "
                             "peak RSS, slower CPU steps); auto: when its gradient checkpointing is on")
    parser.add_argument("--activation-budget-gib", type=float, default=None,
                        help="finsight's activation_budget_gib option: with checkpointing on, only the layers "
                             "whose activations do not fit in this budget recompute")
    parser.add_argument("--packing", action="store_true",
                        help="finsight with data.packing (each micro-batch's conversations share rows of "
                             "max_length), TRL tuned with its own packing (best-fit decreasing over the dataset, "
                             "padding-free): trained tokens/s compare, the batches differ")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="finsight with data.batch_tokens (micro-batches filled to this many tokens, length-"
                             "grouped); TRL keeps --batch-size conversations, which it has no budget for")
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
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the card's dense bf16 peak for the MFU rows (default: Lightning's get_available_flops "
                             f"for the GPU, else {DEFAULT_PEAK_TFLOPS:g}: H100 and H200 SXM)")
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
        release_freed_memory={"true": True, "false": False}.get(args.release_freed_memory, "auto"),
        activation_budget_gib=args.activation_budget_gib, precision=args.precision,
        trl_sampling=args.trl_sampling, trl_presets=trl_presets, packing=args.packing,
        batch_tokens=args.batch_tokens,
        trl_masking=args.trl_masking, num_proc=num_proc, trl_num_proc=trl_num_proc,
        gpu_mode=gpu_mode, cuda=cuda,
        peak_tflops=args.peak_tflops or peak_flops(cuda) or DEFAULT_PEAK_TFLOPS,
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
    print(f"finsight vs TRL, model {settings.model}, precision {settings.trainer_precision}; "
          f"machine: {machine()['description']}; work folder {work}", file=sys.stderr)

    sources = synthetic_mixture(work, settings.rows)
    settings.model_dir = str(build_model_dir(settings.model, work / "model", args.tokenizer))
    if settings.gpu_mode or settings.cuda:
        from transformers import AutoConfig

        settings.flops = flop_coefficients(AutoConfig.from_pretrained(settings.model_dir), settings.lora_r,
                                           settings.target_modules)
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
        "precision": settings.trainer_precision,
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


def entry() -> None:
    """``python benchmarks/compare.py``: the comparison, or with ``--child SPEC`` one of its measurements."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_child(sys.argv[2])
    else:
        main()
