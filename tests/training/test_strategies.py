"""DeepSpeed ZeRO offload: the config a run gets, how the YAML combines with the others, and the one-line
error on a machine without the deepspeed package (simulated by hiding it). Training under DeepSpeed, on the
CPU, is tested in test_deepspeed.py."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT
from jsonargparse import Namespace

from finsight.cli.lightning_cli import main
from finsight.training.deepspeed import (
    DEEPSPEED_INSTALL,
    FinSightDeepSpeedStrategy,
    StrategyUnavailableError,
    deepspeed_config,
    deepspeed_unavailable_reason,
    strategy_problem,
    uses_deepspeed,
)

CONFIGS = ROOT / "configs"
DEEPSPEED_YAML = CONFIGS / "deepspeed_zero2_offload.yaml"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

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
    assert strategy_problem("deepspeed_stage_2_offload") is None


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
