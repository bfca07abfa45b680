"""DeepSpeed ZeRO-2 with optimizer offload, trained for real on the CPU (DeepSpeed's CPU accelerator, gloo between
processes), and the token-exact loss on every strategy.

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
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import ROOT, run_finsight, tiny_fit_args

from finsight.checkpoint_files import read_checkpoint
from finsight.cli.lightning_cli import main
from finsight.data.chat import IGNORE_INDEX
from finsight.data.datamodule import FinSightDataModule
from finsight.training.module import FinSightModule
from finsight.training.reliability import NonFiniteError

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed: pip install 'finsight[deepspeed]'")
DEEPSPEED_YAML = ROOT / "configs" / "deepspeed_zero2_offload.yaml"
# A cold machine compiles DeepSpeed's CPU ops during the first run.
RUN_TIMEOUT_S = 1800
BATCH, ACCUMULATION, STEPS, MAX_LENGTH = 2, 2, 3, 512
RELATIVE_TOLERANCE = 1e-5

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


def run_config(setup: dict[str, Any], out_dir: Path, tag: str) -> Path:
    """The run's config: 3 steps of 2 micro-batches, validation and a checkpoint after every step (all kept:
    Lightning refreshes last.ckpt only when it saves a top-k one), the best checkpoint by *highest* val/loss (so
    that best and last differ and the export test can tell them apart)."""
    config = {
        "trainer": {
            "max_steps": STEPS, "accumulate_grad_batches": ACCUMULATION, "val_check_interval": ACCUMULATION,
            "limit_val_batches": 1, "log_every_n_steps": 1, "gradient_clip_val": 1.0,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/loss", "mode": "max", "save_last": True, "save_top_k": -1,
                               "filename": "step{step}", "auto_insert_metric_name": False,
                               "enable_version_counter": False}},
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
        root: Path | None = None, in_process: bool = False, expect_error: bool = False) -> dict[str, Any]:
    """Run ``finsight fit`` and return what its StepRecorder wrote, per rank, plus the run's folders."""
    root = root or setup["root"] / tag
    out_dir = root / "out"
    args = tiny_fit_args(setup["model_dir"], root, "--config", str(run_config(setup, out_dir, tag)),
                         "--trainer.max_steps", str(STEPS), *extra)
    if deepspeed:
        args += ["--config", str(DEEPSPEED_YAML)]
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
        ranks.append({"steps": json.loads(steps_file.read_text()) if steps_file.exists() else [],
                      "grads": torch.load(grads_file) if grads_file.exists() else None})
    log_dirs = sorted((root / "lightning_logs" / "quickstart").glob("version_*"))
    return {"ranks": ranks, "output": output, "log_dir": log_dirs[-1] if log_dirs else None, "root": root}


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, Any]:
    """The same training on every strategy; DeepSpeed and DDP with 1 and 2 processes where they apply."""
    return {
        "plain": fit(setup, "plain", in_process=True),
        "ddp2": fit(setup, "ddp2", devices=2),
        **({"deepspeed1": fit(setup, "deepspeed1", deepspeed=True),
            "deepspeed2": fit(setup, "deepspeed2", deepspeed=True, devices=2)} if HAS_DEEPSPEED else {}),
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
                                  pytest.param("deepspeed2", marks=needs_deepspeed)])
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
@pytest.mark.parametrize("name, baseline", [("deepspeed1", "plain"), ("deepspeed2", "ddp2")])
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
    got = resumed["ranks"][0]["steps"]
    assert [s["step"] for s in got] == [2, 3]
    for step, expected in zip(got, uninterrupted[1:]):
        assert step["samples"] == expected["samples"]
        assert step["loss"] == pytest.approx(expected["loss"], rel=RELATIVE_TOLERANCE)
        assert step["grad_norm"] == pytest.approx(expected["grad_norm"], rel=RELATIVE_TOLERANCE)
