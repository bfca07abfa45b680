"""The CLI end to end on the tiny model: real 4-bit quantization, real LoRA, real Trainer, real files."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONFIGS, exported_adapter, tiny_fit_args

from finsight.cli.lightning_cli import main
from finsight.training.checkpoint import newest_last_checkpoint


def test_fit_writes_a_loadable_adapter_and_tensorboard_events(tiny_model_dir, tmp_path):
    # The quickstart's own limit_val_batches (4 batches of 2): validation still reaches every source.
    quickstart = yaml.safe_load((CONFIGS[0].parent / "quickstart.yaml").read_text())
    limit = quickstart["trainer"]["limit_val_batches"]
    cli = main(tiny_fit_args(tiny_model_dir, tmp_path, f"--trainer.limit_val_batches={limit}"))
    assert cli.trainer.global_step == 2
    assert cli.datamodule.tokenizer_ref == str(tiny_model_dir)  # the link from model.model_name
    adapter = exported_adapter(cli)
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, adapter)
    lora = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(lora) == 2 * 7  # 2 layers × q/k/v/o/gate/up/down

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    for name in cli.datamodule.source_names:
        assert cli.datamodule.report.source(name).val > 0
        assert f"val/loss/{name}" in tags, name
    for tag in ("train/loss", "val/loss", "val/ppl", "train/grad_norm", "perf/tokens_per_s", "perf/trained_tokens_per_s", "perf/samples_per_s",
                "perf/rss_gb", "lr-AdamW"):
        assert tag in tags, tag
    last = {tag: accumulator.Scalars(tag)[-1].value for tag in tags}
    assert 0 < last["perf/trained_tokens_per_s"] < last["perf/tokens_per_s"]
    assert last["val/ppl"] == pytest.approx(math.exp(last["val/loss"]), rel=1e-4)  # token-weighted, same tokens
    assert (Path(cli.trainer.log_dir) / "data_report.json").is_file()


def test_fit_uses_real_4bit_layers(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    cli = main(tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=1"))
    q_proj = cli.model.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    state = q_proj.base_layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization
    trainable = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name"]
    assert "tokenizer" not in printed["data"]  # linked from model.model_name: given once


def test_help_documents_options_from_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "--model.lora_r" in text and "LoRA rank" in text
    assert "--data.max_length" in text and "truncated" in text


def test_checkpoint_holds_only_the_adapter(tiny_model_dir, tmp_path):
    cli = main(tiny_fit_args(tiny_model_dir, tmp_path))
    ckpt_path = Path(newest_last_checkpoint(cli.trainer))
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    keys = list(checkpoint["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]


def test_ckpt_path_last_resumes_the_latest_run_in_its_own_folder(tiny_model_dir, tmp_path):
    first = main(tiny_fit_args(tiny_model_dir, tmp_path))
    resumed = main(tiny_fit_args(tiny_model_dir, tmp_path, "--trainer.max_steps=3", "--ckpt_path=last"))
    assert resumed.trainer.log_dir == first.trainer.log_dir  # no new version_N folder
    assert resumed.trainer.global_step == 3  # continued from step 2, did not start over


def test_console_command_turns_a_bad_source_into_one_line(tmp_path):
    import subprocess
    import sys

    sources = '[{"name":"mine","path":"/nonexistent/chats.jsonl","format":"messages"}]'
    proc = subprocess.run([sys.executable, "-m", "finsight", "fit", "--config", str(CONFIGS[0].parent / "quickstart.yaml"),
                           f"--data.sources={sources}", "--trainer.logger=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error: source 'mine': file '/nonexistent/chats.jsonl' does not exist" in proc.stderr


def test_validate_and_predict_subcommands_run_on_a_checkpoint(tiny_model_dir, tmp_path):
    fit = main(tiny_fit_args(tiny_model_dir, tmp_path))
    ckpt = newest_last_checkpoint(fit.trainer)
    common = [a for a in tiny_fit_args(tiny_model_dir, tmp_path)[1:] if not a.startswith("--trainer.max_steps")
              and not a.startswith("--trainer.val_check_interval")]
    validate = main(["validate", *common, f"--ckpt_path={ckpt}"])
    assert "val/loss" in validate.trainer.callback_metrics
    # A checkpoint of an earlier version records an option since removed: read all the same, same result.
    old = torch.load(ckpt, weights_only=False, map_location="cpu")
    old["hyper_parameters"]["export_dir"] = "adapter_out"
    torch.save(old, tmp_path / "earlier-version.ckpt")
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append  # finsight's logger does not propagate to caplog once the CLI set it up
    logging.getLogger("finsight.cli.lightning_cli").addHandler(handler)
    try:
        earlier = main(["validate", *common, f"--ckpt_path={tmp_path / 'earlier-version.ckpt'}"])
    finally:
        logging.getLogger("finsight.cli.lightning_cli").removeHandler(handler)
    assert [r.getMessage().endswith("no longer has, ignored: export_dir") for r in warnings] == [True]
    assert earlier.trainer.callback_metrics["val/loss"] == validate.trainer.callback_metrics["val/loss"]
    predict = main(["predict", *common, f"--ckpt_path={ckpt}", "--trainer.limit_predict_batches=2"])
    rows = predict.trainer.predict_loop.predictions
    assert len(rows) == 2 and torch.all(rows[0]["loss"] > 0)

    # One JSON line per conversation, in the run's log folder, matching what predict_step returned.
    import json

    written = Path(predict.trainer.log_dir) / "predictions.jsonl"
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    expected = [(int(i), float(loss), int(n), int(s)) for batch in rows for i, loss, n, s in
                zip(batch["sample_id"], batch["loss"], batch["trained_tokens"], batch["source_index"])]
    assert len(lines) == len(expected) == 4
    names = predict.datamodule.source_names
    for line, (sample_id, loss, tokens, source) in zip(lines, expected):
        assert set(line) == {"sample_id", "source", "loss", "trained_tokens"}
        assert (line["sample_id"], line["source"], line["trained_tokens"]) == (sample_id, names[source], tokens)
        assert line["loss"] == pytest.approx(loss) and line["loss"] > 0 and tokens > 0
    assert not list(Path(predict.trainer.log_dir).glob("*.partial"))

    target = tmp_path / "out" / "scores.jsonl"
    main(["predict", *common, f"--ckpt_path={ckpt}", "--trainer.limit_predict_batches=1",
          f"--predictions_file={target}"])
    assert len(target.read_text().splitlines()) == 2
