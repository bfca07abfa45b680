"""DeepSpeed ZeRO offload: the config a run gets, how the YAML combines with the others, the one-line error on a
machine without the deepspeed package (simulated by hiding it); ZeRO-2 with optimizer offload trained for real on
the CPU (DeepSpeed's CPU accelerator, gloo between processes), and the token-exact loss on every strategy.

One small run per strategy (3 optimizer steps, accumulation 2, dropout 0, a LoRA adapter with non-zero weights so
every LoRA gradient is non-zero) records, per step, the samples it consumed, the logged loss and gradient norm, and
the gradients of its first optimizer step. The data put two long answers and many one-line answers in one epoch, so
the micro-batches of the first step hold very different numbers of trained tokens: a mean of micro-batch means is
far from the mean over the step's tokens, and the tests can tell the two apart.

DeepSpeed and multi-process runs are real ``python -m finsight fit`` subprocesses (Lightning re-runs the command
for rank 1). The first DeepSpeed run on a machine JIT-compiles DeepSpeed's CPU ops (``cpu_adam``, shared-memory
communication) into ``~/.cache/torch_extensions`` (or ``TORCH_EXTENSIONS_DIR``): minutes once, seconds afterwards.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import (
    ROOT,
    ShellPayload,
    error_lines,
    expected_refusal,
    files_under,
    run_entry,
    run_finsight,
    tiny_fit_args,
    tiny_run_args,
)
from jsonargparse import Namespace

from finsight.checkpoint_files import CheckpointError, read_checkpoint, verify_deepspeed_folder
from finsight.cli.lightning_cli import main
from finsight.data.chat import IGNORE_INDEX
from finsight.data.datamodule import FinSightDataModule
from finsight.tensors_only import UnsafeCheckpointError, tensors_only
from finsight.training.deepspeed import (
    DEEPSPEED_INSTALL,
    DeepSpeedSettingsError,
    FinSightDeepSpeedStrategy,
    StrategyUnavailableError,
    deepspeed_config,
    deepspeed_unavailable_reason,
    strategy_problem,
    uses_deepspeed,
)
from finsight.training.module import FinSightModule
from finsight.training.reliability import NonFiniteError

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed: pip install 'finsight[deepspeed]'")
DEEPSPEED_YAML = ROOT / "configs" / "deepspeed_zero2_offload.yaml"
# A cold machine compiles DeepSpeed's CPU ops during the first run.
RUN_TIMEOUT_S = 1800
BATCH, ACCUMULATION, STEPS, MAX_LENGTH = 2, 2, 3, 512
BUDGET = 2 * MAX_LENGTH  # data.batch_tokens of the token-budget run
# Strategies compared on the same batches: the same float32 sums reduced in another order across ranks and
# partitions (differences seen: ~1e-7 relative); a wrong normalisation or a lost micro-batch moves them by percents.
RELATIVE_TOLERANCE = 1e-5
# ZeRO-3 with parameter offload, on top of the ZeRO-2 config: the same run with the base partitioned.
ZERO3 = ("--trainer.strategy.init_args.stage=3", "--trainer.strategy.init_args.offload_param=true")

TOPICS = ["revenue", "gross margin", "operating cash flow", "inventory", "debt", "dividends", "capital spending",
          "research spending", "backlog", "deferred revenue", "share buybacks", "tax rate"]


def _write_sources(folder: Path) -> list[dict[str, Any]]:
    """Two sources: 2 conversations with long answers, 24 with one-sentence answers."""
    folder.mkdir(parents=True, exist_ok=True)
    sentences = [f"In quarter {q} the company reported that {t} moved by {3 + q * 7 % 11} percent, driven by "
                 f"pricing, volume and currency effects in region {q % 5}." for q in range(12) for t in TOPICS[:4]]
    long_rows = [{"messages": [{"role": "user", "content": f"Explain in detail what happened to {topic} this year."},
                               {"role": "assistant", "content": " ".join(sentences[i * 20:(i + 1) * 20])}]}
                 for i, topic in enumerate(["revenue", "margins"])]
    short_rows = [{"messages": [{"role": "user", "content": f"What was the {topic} change in year {2010 + i}?"},
                                {"role": "assistant", "content": f"It changed by {i + 2} percent in {2010 + i}."}]}
                  for i, topic in enumerate(TOPICS * 2)]
    for name, rows in (("long", long_rows), ("short", short_rows)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [{"name": name, "path": str(folder / f"{name}.jsonl"), "format": "messages", "fraction": 1.0}
            for name in ("long", "short")]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """The data, an adapter with random non-zero LoRA weights and no dropout, and the run's config file."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("token-exact")
    sources = _write_sources(root / "data")
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)  # PEFT starts B at zero, which makes every lora_A gradient zero
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    return {"root": root, "sources": sources, "adapter": adapter, "model_dir": tiny_model_dir}


# Lightning's own last.ckpt, refreshed with every top-k save: with every checkpoint kept, each step's.
EVERY_STEP_CHECKPOINTS = [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
     "init_args": {"monitor": "val/loss", "mode": "max", "save_last": True, "save_top_k": -1,
                   "filename": "step{step}", "auto_insert_metric_name": False, "enable_version_counter": False}}]


def run_config(setup: dict[str, Any], out_dir: Path, tag: str, checkpoints: list[dict] | None = None) -> Path:
    """The run's config: 3 steps of 2 micro-batches, validation and a checkpoint after every step (all kept:
    Lightning refreshes last.ckpt only when it saves a top-k one), the best checkpoint by *highest* val/loss (so
    that best and last differ and the export test can tell them apart)."""
    config = {
        "trainer": {
            "max_steps": STEPS, "accumulate_grad_batches": ACCUMULATION, "val_check_interval": ACCUMULATION,
            "limit_val_batches": 1, "log_every_n_steps": 1, "gradient_clip_val": 1.0,
            "callbacks": [
                *(checkpoints or EVERY_STEP_CHECKPOINTS),
                {"class_path": "fit_worker.StepRecorder",
                 "init_args": {"out_dir": str(out_dir), "tag": tag, "grad_step": 0}},
            ],
        },
        "model": {"adapter_path": str(setup["adapter"]), "learning_rate": 1e-3, "warmup_ratio": 0.0},
        "data": {"sources": setup["sources"], "batch_size": BATCH, "val_fraction": 0.1, "max_length": MAX_LENGTH},
    }
    path = out_dir.parent / f"{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def fit(setup: dict[str, Any], tag: str, *extra: str, deepspeed: bool = False, devices: int = 1,
        root: Path | None = None, in_process: bool = False, expect_error: bool = False,
        checkpoints: list[dict] | None = None) -> dict[str, Any]:
    """Run ``finsight fit`` and return what its StepRecorder wrote, per rank, plus the run's folders."""
    root = root or setup["root"] / tag
    out_dir = root / "out"
    strategy = ["--config", str(DEEPSPEED_YAML)] if deepspeed else []  # before ``extra``, which may refine it
    args = tiny_fit_args(setup["model_dir"], root, "--config", str(run_config(setup, out_dir, tag, checkpoints)),
                         "--trainer.max_steps", str(STEPS), *strategy, *extra)
    if devices > 1:
        args += [f"--trainer.devices={devices}", *([] if deepspeed else ["--trainer.strategy=ddp"])]
    output = ""
    if in_process:
        main(args)
    else:
        output = run_finsight(args, setup["root"].parent / "finsight-cache", timeout=RUN_TIMEOUT_S,
                              expect_failure=expect_error)
    ranks = []
    for rank in range(devices):
        steps_file = out_dir / f"{tag}-rank{rank}.json"
        grads_file = out_dir / f"{tag}-rank{rank}-grads.pt"
        memory_file = out_dir / f"{tag}-rank{rank}-memory.json"
        ranks.append({"steps": json.loads(steps_file.read_text()) if steps_file.exists() else [],
                      "grads": torch.load(grads_file) if grads_file.exists() else None,
                      "memory": json.loads(memory_file.read_text()) if memory_file.exists() else None})
    log_dirs = sorted((root / "lightning_logs" / "quickstart").glob("version_*"))
    return {"ranks": ranks, "output": output, "log_dir": log_dirs[-1] if log_dirs else None, "root": root}


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, Any]:
    """The same training on every strategy; DeepSpeed and DDP with 1 and 2 processes where they apply."""
    return {
        "plain": fit(setup, "plain", in_process=True),
        "ddp2": fit(setup, "ddp2", devices=2),
        **({"deepspeed1": fit(setup, "deepspeed1", deepspeed=True),
            "deepspeed2": fit(setup, "deepspeed2", deepspeed=True, devices=2),
            "zero3": fit(setup, "zero3", *ZERO3, deepspeed=True, devices=2),
            # data.packing: the same samples per rank and step, several conversations per row.
            "deepspeed2packed": fit(setup, "deepspeed2packed", "--data.packing=true", deepspeed=True, devices=2),
            # data.batch_tokens: micro-batches of different sizes, taken by the ranks in turn.
            "deepspeed2budget": fit(setup, "deepspeed2budget", f"--data.batch_tokens={BUDGET}", deepspeed=True,
                                    devices=2)}
           if HAS_DEEPSPEED else {}),
    }


# ----------------------------------------------------------------------------------------- reference gradients

def _reference_module(setup: dict[str, Any]) -> FinSightModule:
    module = FinSightModule(model_name=str(setup["model_dir"]), compute_dtype="float32", adapter_path=str(setup["adapter"]),
                            gradient_checkpointing=False)
    module.configure_model()
    return module


def _batch(data: FinSightDataModule, sample_ids: list[int]) -> dict[str, torch.Tensor]:
    rows = data.train_dataset.with_format(columns=["input_ids", "labels"])
    return data.collator()([rows[i] for i in sample_ids])


def _gradients(module: FinSightModule, batches: list[dict[str, torch.Tensor]], token_exact: bool) -> dict:
    """Gradients of the mean over all trained tokens of ``batches`` (as one batch), or of the mean of the
    per-batch token means (what an optimizer step used to get under accumulation and DDP)."""
    module.model.zero_grad()
    sums, counts = [], []
    for batch in batches:
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE_INDEX
        logits = module(batch["input_ids"], batch["attention_mask"])[:, :-1][trained]
        sums.append(F.cross_entropy(logits.float(), targets[trained], reduction="sum"))
        counts.append(trained.sum())
    if token_exact:
        loss = torch.stack(sums).sum() / torch.stack(counts).sum()
    else:
        loss = torch.stack([s / c for s, c in zip(sums, counts)]).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


def _relative_error(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    return max(float((got[k] - expected[k]).norm() / expected[k].norm()) for k in expected)


@pytest.fixture(scope="module")
def reference(setup) -> dict[str, Any]:
    data = FinSightDataModule(sources=setup["sources"], tokenizer=str(setup["model_dir"]), max_length=MAX_LENGTH,
                              batch_size=BATCH, val_fraction=0.1, num_proc=1)
    data.setup("fit")
    return {"data": data, "module": _reference_module(setup)}


@pytest.mark.parametrize("name", ["plain", "ddp2", pytest.param("deepspeed1", marks=needs_deepspeed),
                                  pytest.param("deepspeed2", marks=needs_deepspeed),
                                  pytest.param("zero3", marks=needs_deepspeed),
                                  pytest.param("deepspeed2packed", marks=needs_deepspeed)])
def test_step_gradient_equals_one_big_batch_of_the_same_samples(name, runs, reference):
    ranks = runs[name]["ranks"]
    data, module = reference["data"], reference["module"]
    # Every rank's micro-batches of the first optimizer step, in order.
    micro_batches = [_batch(data, rank["steps"][0]["samples"][i:i + BATCH])
                     for rank in ranks for i in range(0, len(rank["steps"][0]["samples"]), BATCH)]
    assert len(micro_batches) == ACCUMULATION * len(ranks)
    tokens = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches]
    assert max(tokens) >= 5 * min(tokens), tokens  # the case where token means and batch means differ

    expected = _gradients(module, micro_batches, token_exact=True)
    mean_of_means = _gradients(module, micro_batches, token_exact=False)
    assert _relative_error(mean_of_means, expected) > 0.05  # the test can tell the two normalisations apart
    for rank in ranks:  # after the all-reduce every rank applies the same gradient
        assert _relative_error(rank["grads"], expected) < RELATIVE_TOLERANCE
    # The logged loss is the same token mean: the loss of the one big batch.
    with torch.no_grad():
        sums = [F.cross_entropy(module(b["input_ids"], b["attention_mask"])[:, :-1][b["labels"][:, 1:] != -100].float(),
                                b["labels"][:, 1:][b["labels"][:, 1:] != -100], reduction="sum") for b in micro_batches]
    assert ranks[0]["steps"][0]["loss"] == pytest.approx(float(sum(sums)) / sum(tokens), rel=RELATIVE_TOLERANCE)


@needs_deepspeed
def test_token_budget_ranks_run_as_many_micro_batches_and_step_on_all_their_tokens(runs, reference):
    """DeepSpeed ZeRO-2 on 2 processes with data.batch_tokens: every rank runs the same number of micro-batches
    per step (of different sizes), and the step's gradient is the mean over every trained token of the step,
    on both ranks, whatever the micro-batches' sizes."""
    ranks = runs["deepspeed2budget"]["ranks"]
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) >= 1  # the epoch's steps (a few large micro-batches)
    for step in range(len(ranks[0]["steps"])):
        assert [len(rank["steps"][step]["micro_batches"]) for rank in ranks] == [ACCUMULATION, ACCUMULATION]
        assert ranks[0]["steps"][step]["loss"] == ranks[1]["steps"][step]["loss"]
    sizes = [size for rank in ranks for step in rank["steps"] for size in step["micro_batches"]]
    assert len(set(sizes)) > 1, sizes
    data, module = reference["data"], reference["module"]
    samples = [i for rank in ranks for i in rank["steps"][0]["samples"]]
    assert len(set(samples)) == len(samples)
    # The token-exact gradient does not depend on how the samples are split into batches.
    batches = [_batch(data, samples[i:i + BATCH]) for i in range(0, len(samples), BATCH)]
    expected = _gradients(module, batches, token_exact=True)
    for rank in ranks:
        assert _relative_error(rank["grads"], expected) < RELATIVE_TOLERANCE


@needs_deepspeed
@pytest.mark.parametrize("name, baseline", [("deepspeed1", "plain"), ("deepspeed2", "ddp2"), ("zero3", "deepspeed2"),
                                            ("deepspeed2packed", "deepspeed2")])
def test_deepspeed_logs_the_same_loss_and_grad_norm_as_the_plain_strategy(name, baseline, runs):
    got, expected = runs[name]["ranks"][0]["steps"], runs[baseline]["ranks"][0]["steps"]
    assert [s["step"] for s in got] == [s["step"] for s in expected] == list(range(1, STEPS + 1))
    for ours, theirs in zip(got, expected):
        assert ours["samples"] == theirs["samples"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=RELATIVE_TOLERANCE)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=RELATIVE_TOLERANCE)
        assert ours["grad_norm"] > 0


@needs_deepspeed
def test_deepspeed_checkpoints_hold_the_adapter_and_its_optimizer_state_only(runs):
    log_dir = runs["deepspeed1"]["log_dir"]
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    states = torch.load(next(last.rglob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    assert states["module"] and all(".lora_A." in k or ".lora_B." in k for k in states["module"])
    trained = sum(v.numel() for v in states["module"].values())
    optimizer = torch.load(next(last.rglob("*optim_states.pt")), map_location="cpu", weights_only=False)
    partitions = optimizer["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    assert sum(p.numel() for p in partitions) == trained  # fp32 master copy of the adapter, nothing else
    # Adapter (fp32) + master copy + two Adam moments, plus small metadata: nowhere near the base model.
    size = sum(f.stat().st_size for f in last.rglob("*.pt"))
    assert size < 5 * 4 * trained + 200_000


@needs_deepspeed
def test_end_of_fit_export_takes_the_best_deepspeed_checkpoint(runs, tmp_path):
    from safetensors.torch import load_file

    log_dir = runs["deepspeed1"]["log_dir"]
    checkpoints = log_dir / "checkpoints"
    last = read_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == STEPS
    best = Path(next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))["best_model_path"])
    assert best.parent == checkpoints and best.is_dir()
    best_state, last_state = read_checkpoint(best)["state_dict"], last["state_dict"]
    assert best_state.keys() == last_state.keys()
    assert any(not torch.equal(best_state[k], last_state[k]) for k in best_state)  # best is not last

    def matches(adapter: Path, state: dict[str, torch.Tensor]) -> bool:
        exported = load_file(adapter / "adapter_model.safetensors")
        assert len(exported) == len(state)
        # PEFT writes "base_model.model.<...>.lora_A.weight" for the module's "model.base_model.model.<...>.lora_A.default.weight".
        return all(torch.equal(tensor, state["model." + key.replace(".weight", ".default.weight")])
                   for key, tensor in exported.items())

    assert matches(log_dir / "adapter", best_state)
    main(["export", "--checkpoint", str(best), "--output", str(tmp_path / "exported")])
    assert matches(tmp_path / "exported", best_state)


@needs_deepspeed
def test_zero3_partitions_the_base_across_ranks_on_the_cpu(runs):
    """Each of 2 ZeRO-3 ranks stores about half the bytes of every base parameter that a ZeRO-2 rank stores
    whole, on the CPU (``offload_param``); the 4-bit scales are not parameters and stay whole on each rank."""
    whole = runs["deepspeed2"]["ranks"][0]["memory"]
    shards = [rank["memory"] for rank in runs["zero3"]["ranks"]]
    assert not whole["partitioned"] and all(memory["partitioned"] for memory in shards)
    for memory in shards:
        assert 0.45 * whole["base_bytes"] <= memory["base_bytes"] <= 0.55 * whole["base_bytes"], (memory, whole)
        assert 0.45 * whole["adapter_bytes"] <= memory["adapter_bytes"] <= 0.55 * whole["adapter_bytes"]
        assert memory["base_device"] == "cpu"
        assert memory["quant_state_bytes"] == whole["quant_state_bytes"] > 0
    assert sum(memory["base_bytes"] for memory in shards) >= whole["base_bytes"]  # every element somewhere


@needs_deepspeed
def test_zero3_checkpoints_hold_the_adapter_and_its_optimizer_state_only(runs):
    last = runs["zero3"]["log_dir"] / "checkpoints" / "last.ckpt"
    state = read_checkpoint(last)["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    trained = sum(v.numel() for v in state.values())
    for file in last.rglob("*model_states.pt"):
        module = torch.load(file, map_location="cpu", weights_only=True)["module"]
        assert set(module) == set(state)  # names only: ZeRO-3 keeps the values in the optimizer partitions
    partitions = []
    for file in sorted(last.rglob("*optim_states.pt")):
        with tensors_only(file, deepspeed=True):
            partitions += torch.load(file, map_location="cpu", weights_only=True)["optimizer_state_dict"][
                "fp32_flat_groups"]
    assert len(partitions) == 2
    assert trained <= sum(p.numel() for p in partitions) < trained + 2 * 64  # each rank's slice, padded
    size = sum(f.stat().st_size for f in last.rglob("*.pt"))
    assert size < 5 * 4 * trained + 400_000


@needs_deepspeed
def test_zero3_trains_the_adapter_zero2_trains(runs, tmp_path):
    """The adapter of the ZeRO-3 run equals ZeRO-2's (same batches; float32 rounding apart), read from the
    checkpoint and exported from it as an adapter, a merged model and a GGUF file."""
    from safetensors.torch import load_file

    folders = {name: runs[name]["log_dir"] / "checkpoints" / "last.ckpt" for name in ("zero3", "deepspeed2")}
    states = {name: read_checkpoint(folder)["state_dict"] for name, folder in folders.items()}
    assert states["zero3"].keys() == states["deepspeed2"].keys()
    for key, tensor in states["zero3"].items():
        torch.testing.assert_close(tensor, states["deepspeed2"][key], rtol=1e-4, atol=1e-6)
    for name, folder in folders.items():
        main(["export", "--checkpoint", str(folder), "--output", str(tmp_path / name)])
        main(["export", "--checkpoint", str(folder), "--output", str(tmp_path / f"{name}-merged"), "--merged", "true"])
    zero3, zero2 = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("zero3", "deepspeed2"))
    assert zero3.keys() == zero2.keys() and len(zero3) == len(states["zero3"])
    for key in zero3:
        torch.testing.assert_close(zero3[key], zero2[key], rtol=1e-4, atol=1e-6)
    # The end-of-fit export of the best checkpoint, gathered from the ZeRO-3 partitions.
    ended = [load_file(runs[name]["log_dir"] / "adapter" / "adapter_model.safetensors") for name in ("zero3", "deepspeed2")]
    assert ended[0].keys() == zero3.keys()
    for key in zero3:
        torch.testing.assert_close(ended[0][key], ended[1][key], rtol=1e-4, atol=1e-6)
    merged = [load_file(next((tmp_path / f"{name}-merged").glob("*.safetensors"))) for name in ("zero3", "deepspeed2")]
    for key in merged[0]:
        torch.testing.assert_close(merged[0][key], merged[1][key], rtol=1e-4, atol=1e-5)
    import gguf
    import numpy as np

    def gguf_tensors(name: str) -> dict[str, torch.Tensor]:
        path = main(["export", "--checkpoint", str(folders[name]), "--output", str(tmp_path / f"{name}-gguf"),
                     "--gguf", "true", "--gguf_type", "f16"])
        return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
                for t in gguf.GGUFReader(path).tensors}

    written = [gguf_tensors(name) for name in ("zero3", "deepspeed2")]
    assert written[0].keys() == written[1].keys() and written[0]
    for key in written[0]:  # float16 files: equal up to one float16 rounding step
        torch.testing.assert_close(written[0][key], written[1][key], rtol=2**-10, atol=1e-6, msg=key)


@needs_deepspeed
def test_zero3_killed_inside_a_checkpoint_save_resumes_exactly(setup, runs, tmp_path):
    """A SIGKILL after the first file of step 2's checkpoint folder, on 2 ZeRO-3 ranks: last.ckpt is step 1's
    complete folder, and ``--ckpt_path last`` trains steps 2 and 3 as the uninterrupted run did; then validate
    reads the ZeRO-3 checkpoint."""
    kill = '--trainer.callbacks+={"class_path": "fit_worker.KillInsideSave", "init_args": {"step": 2}}'
    killed = fit(setup, "zero3-kill", *ZERO3, kill, deepspeed=True, devices=2, root=tmp_path / "ds", expect_error=True)
    assert "KillInsideSave: killed after writing" in killed["output"], killed["output"][-3000:]
    checkpoints = killed["log_dir"] / "checkpoints"
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 1
    resumed = fit(setup, "zero3-kill", *ZERO3, "--ckpt_path=last", deepspeed=True, devices=2, root=tmp_path / "ds")
    uninterrupted = runs["zero3"]["ranks"][0]["steps"]
    assert_continues(resumed["ranks"][0]["steps"], uninterrupted, first_step=2)
    output = run_finsight(tiny_run_args("validate", setup["model_dir"], tmp_path,
                                        "--config", str(run_config(setup, tmp_path / "out", "validate")),
                                        "--config", str(DEEPSPEED_YAML), *ZERO3, "--trainer.devices=2",
                                        "--ckpt_path", str(checkpoints / "last.ckpt")),
                          setup["root"].parent / "finsight-cache", timeout=RUN_TIMEOUT_S)
    # The loss of the checkpoint's weights on the same validation batch as the fit's last validation.
    assert _printed_metric(output, "val/loss") == pytest.approx(_logged(killed["log_dir"], "val/loss")[-1],
                                                                 rel=RELATIVE_TOLERANCE)


@needs_deepspeed
def test_zero3_test_answers_as_zero2_does(setup, runs, tmp_path):
    """``finsight test`` on 2 ranks, ZeRO-3 reading its checkpoint against ZeRO-2 reading its own: the same test
    loss and the same greedy answers (each rank builds its generation model from the gathered weights)."""
    results = {}
    for name, options in (("zero3", ZERO3), ("deepspeed2", ())):
        folder = tmp_path / name
        output = run_finsight(tiny_run_args("test", setup["model_dir"], folder,
                                            "--config", str(run_config(setup, folder / "out", "test")),
                                            "--config", str(DEEPSPEED_YAML), *options, "--trainer.devices=2",
                                            "--trainer.limit_test_batches=1", "--eval.max_samples=2",
                                            "--eval.max_new_tokens=6",
                                            "--ckpt_path", str(runs[name]["log_dir"] / "checkpoints" / "last.ckpt")),
                              setup["root"].parent / "finsight-cache", timeout=RUN_TIMEOUT_S)
        (written,) = (folder / "lightning_logs").rglob("eval_results.json")
        results[name] = (_printed_metric(output, "test/loss"), json.loads(written.read_text()))
    (zero3_loss, zero3), (zero2_loss, zero2) = results["zero3"], results["deepspeed2"]
    assert zero3_loss == pytest.approx(zero2_loss, rel=RELATIVE_TOLERANCE)
    answers = [[sample["answer"] for sample in found["samples"]["fine_tuned"]] for found in (zero3, zero2)]
    assert answers[0] == answers[1] and len(answers[0]) >= 2


def assert_continues(got: list[dict], uninterrupted: list[dict], first_step: int) -> None:
    """A resumed run's steps are the uninterrupted run's from ``first_step`` on: samples, loss, grad norm."""
    assert [s["step"] for s in got] == list(range(first_step, STEPS + 1))
    for step, expected in zip(got, uninterrupted[first_step - 1:]):
        assert step["samples"] == expected["samples"]
        assert step["loss"] == pytest.approx(expected["loss"], rel=RELATIVE_TOLERANCE)
        assert step["grad_norm"] == pytest.approx(expected["grad_norm"], rel=RELATIVE_TOLERANCE)


def _printed_metric(output: str, name: str) -> float:
    """A metric from the table Lightning prints at the end of validate/test."""
    found = re.search(rf"│\s*{re.escape(name)}\s*│\s*([-0-9.e]+)\s*│", output)
    assert found, output[-3000:]
    return float(found.group(1))


def _logged(log_dir: Path, tag: str) -> list[float]:
    """The values of a scalar in a run's TensorBoard events, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.value for event in sorted(events.Scalars(tag), key=lambda event: event.step)]


def _poisoned_copy(folder: Path, target: Path, file_glob: str, marker: Path) -> Path:
    """A copy of a DeepSpeed checkpoint folder with a payload added to the one file matching ``file_glob``."""
    shutil.copytree(folder, target)
    (file,) = target.rglob(file_glob)
    with tensors_only(file, deepspeed=True):
        state = torch.load(file, map_location="cpu", weights_only=True)
    state["note"] = ShellPayload(marker)
    torch.save(state, file)
    return file


@needs_deepspeed
@pytest.mark.parametrize("poisoned_file", ["mp_rank_00_model_states.pt", "*optim_states.pt"])
def test_a_poisoned_deepspeed_folder_is_refused_by_every_command_naming_the_file(runs, setup, tmp_path, poisoned_file,
                                                                                monkeypatch, capsys):
    marker = tmp_path / "marker"
    folder = tmp_path / "shared.ckpt"
    file = _poisoned_copy(runs["deepspeed1"]["log_dir"] / "checkpoints" / "last.ckpt", folder, poisoned_file, marker)
    root = tmp_path / "run"
    commands = {
        "export": ["export", "--checkpoint", str(folder), "--output", str(root / "exported")],
        "chat": ["chat", "--ckpt_path", str(folder), "--prompt", "Hi", "--max_new_tokens", "2"],
        **{command: tiny_run_args(command, setup["model_dir"], root, "--ckpt_path", str(folder))
           for command in ("fit", "validate", "test", "predict")},
    }
    for name, args in commands.items():
        status, stderr = run_entry(monkeypatch, capsys, args)
        assert status == 1, name
        assert error_lines(stderr) == [expected_refusal(file, "posix.system")], name
    assert not marker.exists()
    assert files_under(root) == []


@needs_deepspeed
def test_deepspeeds_own_loader_is_held_to_data_only(runs, tmp_path):
    """DeepSpeed's checkpoint engine asks torch.load for full unpickling (``weights_only=False``); inside
    finsight's block torch refuses the payload all the same, whatever reaches it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "marker"
    file = _poisoned_copy(runs["deepspeed1"]["log_dir"] / "checkpoints" / "last.ckpt", tmp_path / "shared.ckpt",
                          "*optim_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=f"checkpoint {tmp_path / 'shared.ckpt'} holds posix.system"):
        with tensors_only(tmp_path / "shared.ckpt", deepspeed=True):
            TorchCheckpointEngine().load(str(file), map_location="cpu")
    assert not marker.exists()


@needs_deepspeed
def test_a_latest_tag_that_leaves_the_folder_is_refused(runs, tmp_path):
    folder = tmp_path / "shared.ckpt"
    shutil.copytree(runs["deepspeed1"]["log_dir"] / "checkpoints" / "last.ckpt", folder)
    (folder / "latest").write_text("../elsewhere")
    with pytest.raises(CheckpointError, match="its 'latest' file names '../elsewhere', not a folder inside"):
        read_checkpoint(folder)


@needs_deepspeed
def test_finsights_own_deepspeed_checkpoint_validates_and_chats(runs, setup, tmp_path, monkeypatch, capsys):
    """Every file of the folder passes the data-only check; validate (DeepSpeed strategy, its own loader) and
    the chat read it."""
    last = runs["deepspeed1"]["log_dir"] / "checkpoints" / "last.ckpt"
    verify_deepspeed_folder(last)
    output = run_finsight(tiny_run_args("validate", setup["model_dir"], tmp_path,
                                        "--config", str(run_config(setup, tmp_path / "out", "validate")),
                                        "--config", str(DEEPSPEED_YAML), "--ckpt_path", str(last)),
                          setup["root"].parent / "finsight-cache", timeout=RUN_TIMEOUT_S)
    assert "val/loss" in output, output[-3000:]
    for folder in (last, runs["zero3"]["log_dir"] / "checkpoints" / "last.ckpt"):  # ZeRO-2 and ZeRO-3 folders
        verify_deepspeed_folder(folder)
        status, stderr = run_entry(monkeypatch, capsys, ["chat", "--ckpt_path", str(folder), "--prompt", "Hi",
                                                         "--max_new_tokens", "3"])
        assert status == 0, stderr[-3000:]


@needs_deepspeed
def test_deepspeed_nan_gradient_stops_like_the_plain_strategy_and_resume_continues_exactly(setup, runs, tmp_path):
    inject = ('--trainer.callbacks+={"class_path": "fit_worker.InjectNonFinite", '
              '"init_args": {"step": 2, "where": "grad"}}')
    with pytest.raises(NonFiniteError) as plain_error:
        fit(setup, "plain-nan", inject, in_process=True, root=tmp_path / "plain")
    stopped = fit(setup, "deepspeed-nan", inject, deepspeed=True, root=tmp_path / "ds", expect_error=True)
    errors = [line for line in stopped["output"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stopped["output"][-3000:]
    message = errors[0].removeprefix("error: ")
    # The same message, the checkpoint path aside.
    assert message.split("; the last good checkpoint is")[0] == str(plain_error.value).split("; the last good")[0]
    assert "the gradient of model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight has NaN values" in message
    assert message.endswith(str(stopped["log_dir"] / "checkpoints" / "last.ckpt"))
    assert [s["step"] for s in stopped["ranks"][0]["steps"]] == [1, 2]

    # Resume from that checkpoint (`--ckpt_path last`): the remaining step is the uninterrupted run's.
    resumed = fit(setup, "deepspeed-nan", "--ckpt_path=last", deepspeed=True, root=tmp_path / "ds")
    uninterrupted = runs["deepspeed1"]["ranks"][0]["steps"]
    got = resumed["ranks"][0]["steps"]
    assert [s["step"] for s in got] == [3]
    assert got[0]["samples"] == uninterrupted[2]["samples"]
    assert got[0]["loss"] == pytest.approx(uninterrupted[2]["loss"], rel=RELATIVE_TOLERANCE)
    assert got[0]["grad_norm"] == pytest.approx(uninterrupted[2]["grad_norm"], rel=RELATIVE_TOLERANCE)


@needs_deepspeed
def test_deepspeed_killed_inside_a_checkpoint_folder_write_resumes_from_the_previous_one(setup, runs, tmp_path):
    """Killed after the first file of step 2's checkpoint folder: the partial folder is only a hidden
    temporary, last.ckpt is step 1's complete folder, and the resume trains steps 2 and 3 exactly."""
    kill = '--trainer.callbacks+={"class_path": "fit_worker.KillInsideSave", "init_args": {"step": 2}}'
    killed = fit(setup, "deepspeed-kill", kill, deepspeed=True, root=tmp_path / "ds", expect_error=True)
    assert "KillInsideSave: killed after writing" in killed["output"], killed["output"][-3000:]
    checkpoints = killed["log_dir"] / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == [".step2.ckpt.tmp-step2", "last.ckpt", "step1.ckpt"], names
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 1

    resumed = fit(setup, "deepspeed-kill", "--ckpt_path=last", deepspeed=True, root=tmp_path / "ds")
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # cleared by the next save
    uninterrupted = runs["deepspeed1"]["ranks"][0]["steps"]
    assert_continues(resumed["ranks"][0]["steps"], uninterrupted, first_step=2)



@needs_deepspeed
def test_deepspeed_last_checkpoint_is_the_final_step_after_validations_that_did_not_improve(setup, tmp_path):
    """LatestCheckpoint beside a best-only ModelCheckpoint, on 2 DeepSpeed ranks: the best stays at step 1
    (``mode: max`` on a falling val/loss), and last.ckpt is the folder of step 3, written on both ranks."""
    checkpoints = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/loss", "mode": "max", "save_top_k": 1, "save_last": False,
                                  "filename": "step{step}", "auto_insert_metric_name": False}},
                   {"class_path": "finsight.callbacks.LatestCheckpoint"}]
    run = fit(setup, "deepspeed-latest", deepspeed=True, devices=2, root=tmp_path, checkpoints=checkpoints)
    folder = run["log_dir"] / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    last = read_checkpoint(folder / "last.ckpt")
    assert last["global_step"] == STEPS and (folder / "last.ckpt").is_dir()
    best = Path(next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))["best_model_path"])
    assert names == sorted(["last.ckpt", best.name]), names
    assert read_checkpoint(best)["global_step"] < STEPS, best  # where Lightning's own last.ckpt would be


@needs_deepspeed
def test_deepspeed_full_disk_inside_a_checkpoint_folder_is_one_error_line_and_keeps_the_previous_one(setup, tmp_path):
    full = ('--trainer.callbacks+={"class_path": "fit_worker.KillInsideSave", '
            '"init_args": {"step": 2, "full_disk": true}}')
    stopped = fit(setup, "deepspeed-full", full, deepspeed=True, root=tmp_path, expect_error=True)
    checkpoints = stopped["log_dir"] / "checkpoints"
    errors = [line for line in stopped["output"].splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left in {checkpoints} to write checkpoint "
                                                     "step2.ckpt: it needs about "), stopped["output"][-3000:]
    assert errors[0].endswith("the previous files are intact") and "Traceback" not in stopped["output"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step1.ckpt"]  # no partial folder
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 1

# ----------------------------------------------------------------------------------------- the config and its checks

CONFIGS = ROOT / "configs"

ZERO_BUCKETS = {"contiguous_gradients": True, "overlap_comm": True, "allgather_partitions": True,
                "reduce_scatter": True, "allgather_bucket_size": 200_000_000,
                "reduce_bucket_size": 200_000_000, "sub_group_size": 1_000_000_000_000}


@pytest.fixture
def strategy_log(caplog):
    """Records of finsight.training.deepspeed (the finsight logger does not propagate to the root logger)."""
    from finsight.training import deepspeed as strategies

    strategies._log_once.cache_clear()
    logger = logging.getLogger("finsight")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="finsight.training.deepspeed")
    yield caplog
    logger.removeHandler(caplog.handler)


def yaml_strategy_args() -> dict:
    return yaml.safe_load(DEEPSPEED_YAML.read_text())["trainer"]["strategy"]["init_args"]


def test_yaml_gives_zero2_with_optimizer_offload_to_pinned_cpu(strategy_log):
    args = yaml_strategy_args()
    settings = {k: args[k] for k in ("stage", "offload_optimizer", "offload_optimizer_device", "offload_param",
                                     "offload_param_device", "pin_memory")}
    config = deepspeed_config(**settings)
    assert config == {
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 2, **ZERO_BUCKETS,
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    }
    # The methodology's offload_param is in the YAML, but stage 2 cannot honour it: left out, said once.
    assert args["offload_param"] is True and "offload_param" not in config["zero_optimization"]
    deepspeed_config(**settings)
    # (One record may reach the capture twice: through the finsight logger and, while it still propagates,
    # through the root logger.)
    records = {id(r): r for r in strategy_log.records if r.name == "finsight.training.deepspeed"}
    messages = [r.getMessage() for r in records.values()]
    assert len(messages) == 1
    assert "offload_param is ignored with ZeRO stage 2" in messages[0] and "stage 3" in messages[0]
    assert args["exclude_frozen_parameters"] is True


def test_offload_param_is_applied_for_stage3(strategy_log):
    zero = deepspeed_config(stage=3, offload_param=True)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert not strategy_log.records


def test_batch_size_and_accumulation_are_left_to_lightning():
    def keys(node) -> set[str]:
        if isinstance(node, dict):
            return set(node) | {k for v in node.values() for k in keys(v)}
        return set()

    # Lightning writes these from data.batch_size, trainer.accumulate_grad_batches and
    # trainer.gradient_clip_val, and refuses a config that already holds the accumulation.
    owned_by_lightning = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                          "gradient_clipping", "bf16", "fp16"}
    assert not keys(deepspeed_config(stage=3, offload_param=True)) & owned_by_lightning
    assert not keys(yaml.safe_load(DEEPSPEED_YAML.read_text())) & owned_by_lightning


def test_lightning_can_infer_the_micro_batch_size_from_the_train_loader(tiny_tokenizer):
    """DeepSpeedStrategy reads ``train_dataloader.batch_sampler.batch_size`` for
    ``train_micro_batch_size_per_gpu``; without it DeepSpeed would log throughput for batch size 1."""
    from helpers import sample_sources

    from finsight.data.datamodule import FinSightDataModule

    dm = FinSightDataModule(sources=sample_sources(), tokenizer=tiny_tokenizer, max_length=256, batch_size=3,
                            num_proc=1)
    dm.setup("fit")
    assert dm.train_dataloader().batch_sampler.batch_size == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"stage": 0}, "stage must be 1, 2 or 3, got 0"),
    ({"offload_optimizer_device": "nvme"}, "offload_optimizer_device must be 'cpu'"),
    ({"stage": 3, "offload_param": True, "offload_param_device": "disk"}, "offload_param_device must be 'cpu'"),
])
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        deepspeed_config(**kwargs)


@pytest.mark.parametrize("strategy, expected", [
    ("deepspeed", True), ("deepspeed_stage_2_offload", True), ("ddp", False), ("auto", False), (None, False),
    (Namespace(class_path="finsight.callbacks.FinSightDeepSpeedStrategy"), True),
    (Namespace(class_path="lightning.pytorch.strategies.DeepSpeedStrategy"), True),
    (Namespace(class_path="lightning.pytorch.strategies.DDPStrategy"), False),
])
def test_deepspeed_is_recognised_in_every_form(strategy, expected):
    assert uses_deepspeed(strategy) is expected
    if not expected:
        assert strategy_problem(strategy) is None


@pytest.fixture
def without_deepspeed(monkeypatch):
    """This machine as one without the deepspeed package."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "deepspeed" else find_spec(name, *args))


def test_strategy_refuses_to_start_without_deepspeed(without_deepspeed):
    with pytest.raises(StrategyUnavailableError) as error:
        FinSightDeepSpeedStrategy()
    message = str(error.value)
    assert message == f"DeepSpeed strategy requested, but the deepspeed package is not installed ({DEEPSPEED_INSTALL})"
    assert deepspeed_unavailable_reason() in message


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed")
def test_deepspeed_needs_no_cuda():
    assert deepspeed_unavailable_reason() is None
    assert strategy_problem(Namespace(class_path="finsight.callbacks.FinSightDeepSpeedStrategy")) is None


@needs_deepspeed
@pytest.mark.parametrize("strategy", ["deepspeed_stage_3", "deepspeed_stage_2_offload",
                                      Namespace(class_path="lightning.pytorch.strategies.DeepSpeedStrategy")])
def test_lightnings_own_deepspeed_strategy_is_refused_before_loading_anything(strategy):
    name = strategy if isinstance(strategy, str) else strategy.class_path
    assert strategy_problem(strategy) == (
        f"trainer.strategy {name!r} is Lightning's own DeepSpeedStrategy, which does not train 4-bit models "
        "correctly; use finsight.callbacks.FinSightDeepSpeedStrategy, e.g. --config "
        "configs/deepspeed_zero2_offload.yaml or configs/deepspeed_zero3_offload.yaml")


@needs_deepspeed
@pytest.mark.parametrize(("stage", "offload_optimizer", "offload_param", "exclude_frozen_parameters",
                          "load_full_weights"), list(itertools.product((1, 2, 3), *[(True, False)] * 4)))
def test_every_strategy_option_builds_or_is_refused_in_one_line(stage, offload_optimizer, offload_param,
                                                                 exclude_frozen_parameters, load_full_weights):
    """The strategy's options, every combination: the strategy is built with the DeepSpeed config they say, or
    refused before any model is loaded with one message naming the option and what to do instead."""
    options = {"stage": stage, "offload_optimizer": offload_optimizer, "offload_param": offload_param,
               "exclude_frozen_parameters": exclude_frozen_parameters, "load_full_weights": load_full_weights}
    if load_full_weights:
        with pytest.raises(DeepSpeedSettingsError) as refused:
            FinSightDeepSpeedStrategy(**options)
        assert str(refused.value).startswith("load_full_weights: true loads one file of the whole model")
        assert str(refused.value).endswith("; remove load_full_weights")
        return
    zero = FinSightDeepSpeedStrategy(**options).config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) is offload_optimizer
    assert ("offload_param" in zero) is (offload_param and stage == 3)


@needs_deepspeed
@pytest.mark.parametrize("options", [
    ("--trainer.strategy.init_args.stage=1",),
    ("--trainer.strategy.init_args.stage=3", "--trainer.strategy.init_args.offload_optimizer=false"),
    ("--trainer.strategy.init_args.stage=3", "--trainer.strategy.init_args.exclude_frozen_parameters=false",
     "--model.quantization=none"),
], ids=["stage1", "stage3-no-offload", "stage3-frozen-saved-unquantized"])
def test_the_strategy_options_that_change_the_code_path_train_and_export(setup, tmp_path, options):
    """One real step of the combinations that take another path than the tests above (ZeRO-1; ZeRO-3 with a
    torch optimizer on its partitions; ZeRO-3 saving the frozen weights, unquantized): each trains, checkpoints
    and exports its adapter."""
    run = fit(setup, "options", *options, "--trainer.max_steps=1", deepspeed=True, root=tmp_path,
              checkpoints=[{"class_path": "finsight.callbacks.LatestCheckpoint"}])
    assert [step["step"] for step in run["ranks"][0]["steps"]] == [1], run["output"][-3000:]
    assert read_checkpoint(run["log_dir"] / "checkpoints" / "last.ckpt")["state_dict"]
    assert (run["log_dir"] / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("strategy_args", [
    ["--config", str(DEEPSPEED_YAML)],
    ["--trainer.strategy=deepspeed_stage_2_offload"],
])
def test_cli_stops_with_one_line_error_before_loading_anything(strategy_args, tmp_path, without_deepspeed):
    missing_model = tmp_path / "not-a-model"  # loading it would fail differently
    with pytest.raises(StrategyUnavailableError) as raised:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *strategy_args,
              f"--model.model_name={missing_model}"])
    assert str(raised.value) == ("DeepSpeed strategy requested, but the deepspeed package is not installed "
                                 f"({DEEPSPEED_INSTALL})")


HIDE_DEEPSPEED = ("import importlib.util as u, sys; find_spec = u.find_spec; "
                  "u.find_spec = lambda name, *a: None if name == 'deepspeed' else find_spec(name, *a); "
                  "from finsight.__main__ import entry; sys.exit(entry())")


def test_command_line_error_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "-c", HIDE_DEEPSPEED, "fit", "--config", str(CONFIGS / "quickstart.yaml"),
         "--config", str(DEEPSPEED_YAML)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: DeepSpeed strategy requested, but the deepspeed package is not installed ({DEEPSPEED_INSTALL})"


def test_yaml_merges_with_the_quickstart_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(DEEPSPEED_YAML),
              "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "finsight.callbacks.FinSightDeepSpeedStrategy"
    assert strategy["init_args"] == {
        "stage": 2, "offload_optimizer": True, "offload_optimizer_device": "cpu", "offload_param": True,
        "offload_param_device": "cpu", "pin_memory": True, "exclude_frozen_parameters": True,
        "load_full_weights": False, "logging_level": logging.WARN,
    }
    quickstart = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    # Everything else still comes from the first config.
    assert printed["model"]["model_name"] == quickstart["model"]["model_name"]
    assert printed["data"]["batch_size"] == quickstart["data"]["batch_size"]
    assert printed["trainer"]["accumulate_grad_batches"] == quickstart["trainer"]["accumulate_grad_batches"]


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed")
def test_strategy_carries_the_built_config_and_offloads_the_optimizer():
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from lightning.pytorch.strategies import DDPStrategy

    from finsight.training.deepspeed import adamw_for

    strategy = FinSightDeepSpeedStrategy(stage=2, offload_param=True)
    assert strategy.config == deepspeed_config(stage=2, offload_param=True)
    assert strategy.exclude_frozen_parameters is True
    params = [torch.nn.Parameter(torch.zeros(2))]
    # Offloaded optimizer state: DeepSpeed's CPU Adam (DeepSpeed refuses torch's there); elsewhere torch's AdamW.
    offloaded = adamw_for(strategy, params, lr=1e-3, weight_decay=0.1)
    assert type(offloaded) is DeepSpeedCPUAdam and offloaded.adam_w_mode
    kept = adamw_for(FinSightDeepSpeedStrategy(stage=2, offload_optimizer=False), params, lr=1e-3, weight_decay=0.1)
    assert type(kept) is torch.optim.AdamW and type(adamw_for(DDPStrategy(), params, lr=1e-3, weight_decay=0.1)) is torch.optim.AdamW
    assert kept.defaults["weight_decay"] == 0.1
