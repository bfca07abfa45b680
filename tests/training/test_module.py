"""FinSightModule on the tiny model: loss, schedule, adapter-only checkpoints, resume, export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import prepared_datamodule, qlora_module_for_gradients, sample_sources

from finsight import FinSightDataModule, FinSightModule, compat
from finsight.cli.lightning_cli import main
from finsight.training.checkpoint import newest_last_checkpoint
from finsight.training.module import PrecisionError, planned_optimizer_steps, warmup_steps


@pytest.fixture()
def datamodule(tiny_model_dir):
    dm = FinSightDataModule(sources=sample_sources(), tokenizer=str(tiny_model_dir), max_length=512,
                            batch_size=2, num_proc=1)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: per-sample summed next-token loss from the full logits, and trained tokens per sample."""
    per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                reduction="none")
    return per_token.sum(dim=1), (labels[:, 1:] != -100).sum(dim=1)


def make_trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, precision="32-true", max_steps=3, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=1, default_root_dir=str(root))
    return L.Trainer(**{**defaults, **kwargs})


def test_the_per_sample_loss_equals_the_full_logit_loss_and_the_hugging_face_loss(tiny_model_dir, datamodule):
    """``sample_losses`` (validation, test, predict, compare_base) runs the head on trained positions only."""
    module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32")
    module.configure_model()
    module.eval()
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        losses = module.sample_losses(batch)
        loss_sum, n_tokens = token_losses(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        theirs = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
    torch.testing.assert_close(losses.loss_sum, loss_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(losses.n_tokens, n_tokens) and n_tokens.sum() == (batch["labels"][:, 1:] != -100).sum()
    assert losses.logits.shape == (int(n_tokens.sum()), module.model.config.vocab_size)
    assert losses.targets.tolist() == batch["labels"][:, 1:][batch["labels"][:, 1:] != -100].tolist()
    torch.testing.assert_close(losses.loss_sum.sum() / losses.n_tokens.sum(), theirs, rtol=1e-5, atol=1e-5)
    means, weights = losses.means()
    torch.testing.assert_close((means * weights).sum() / weights.sum(), theirs, rtol=1e-5, atol=1e-5)


def _full_logit_loss(module, batch):
    loss_sum, n_tokens = token_losses(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    return loss_sum.sum() / n_tokens.sum()


def _lora_grads(module, loss):
    module.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def test_training_step_runs_the_head_on_trained_positions_with_the_same_loss_and_gradients(
        tiny_model_dir, datamodule, monkeypatch):
    module = qlora_module_for_gradients(tiny_model_dir, monkeypatch)
    batch = next(iter(datamodule.train_dataloader()))
    head_rows = []
    head = module.model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: head_rows.append(args[0].shape[:-1].numel()))
    ours = module.training_step(batch, 0)
    handle.remove()
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert module._head_on_hidden is True
    # The probe runs the head on 2 x 16 positions, the training step on the trained ones only.
    assert head_rows[-1] == trained < batch["input_ids"].numel()
    ours_grads = _lora_grads(module, ours)
    theirs = _full_logit_loss(module, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    theirs_grads = _lora_grads(module, theirs)
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) > 0
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], theirs_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_models_whose_logits_are_not_the_plain_head_keep_the_full_forward(tmp_path, tiny_tokenizer, datamodule,
                                                                         monkeypatch):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          final_logit_softcapping=1.0, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma")
    tiny_tokenizer.save_pretrained(tmp_path / "gemma")
    module = FinSightModule(model_name=str(tmp_path / "gemma"), compute_dtype="float32", lora_dropout=0.0,
                            attn_implementation="eager")
    module.configure_model()
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    batch = next(iter(datamodule.train_dataloader()))
    ours = module.training_step(batch, 0)
    assert module._head_on_hidden is False  # soft-capped logits are not lm_head(hidden)
    torch.testing.assert_close(ours, _full_logit_loss(module, batch), rtol=1e-5, atol=1e-6)


def test_only_lora_parameters_train_and_the_optimizer_holds_only_them(tiny_model_dir, datamodule, tmp_path):
    module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32")
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=datamodule)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen_grads = [n for n, p in module.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen_grads == []
    optimizer = trainer.optimizers[0]
    in_optimizer = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert in_optimizer == sum(p.numel() for p in module.parameters() if p.requires_grad)


class LearningRates(L.Callback):
    def __init__(self):
        self.values = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.values.append(optimizer.param_groups[0]["lr"])


def test_learning_rate_follows_linear_warmup_and_decay(tiny_model_dir, datamodule, tmp_path):
    steps, accumulation, lr, ratio = 10, 2, 1e-3, 0.2
    module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32", learning_rate=lr,
                            warmup_ratio=ratio)
    rates = LearningRates()
    trainer = make_trainer(tmp_path, max_steps=steps, accumulate_grad_batches=accumulation,
                           callbacks=[rates], limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    warmup = warmup_steps(steps, ratio)
    expected = [lr * s / warmup if s < warmup else lr * (steps - s) / (steps - warmup) for s in range(steps)]
    # One value per optimizer step (every `accumulation` batches), stepped once per optimizer step.
    assert rates.values == pytest.approx(expected)


class StepCounts(L.LightningModule):
    """A one-weight module that records, in ``configure_optimizers``, the schedule length finsight plans and
    Lightning's own estimate (read second: it builds the trainer's loader, which the first must not need)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.counts: tuple = ()

    def training_step(self, batch, batch_idx):
        return self.weight * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        planned = planned_optimizer_steps(self.trainer)
        built_before = self.trainer.train_dataloader is not None
        self.counts = (planned, built_before, self.trainer.estimated_stepping_batches)
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("settings", [
    dict(max_steps=-1, max_epochs=2, accumulate_grad_batches=3),
    dict(max_steps=5, max_epochs=1),
    dict(max_steps=-1, max_epochs=1, limit_train_batches=7, accumulate_grad_batches=2),
    dict(max_steps=-1, max_epochs=3, limit_train_batches=0.25),
])
def test_schedule_length_is_lightnings_estimate_without_building_the_trainers_loader(
        datamodule, tmp_path, settings):
    module = StepCounts()
    trainer = make_trainer(tmp_path, limit_val_batches=0, **settings)
    trainer.fit(module, datamodule=datamodule)
    planned, built_before, estimated = module.counts
    assert not built_before
    assert planned == estimated
    assert planned > 1


def test_checkpoint_size_is_near_the_adapter_and_resume_restores_everything(tiny_model_dir, tmp_path):
    from helpers import tiny_fit_args

    cli = main(tiny_fit_args(tiny_model_dir, tmp_path))
    ckpt = Path(newest_last_checkpoint(cli.trainer))
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    budget = trainable * (4 + 4 + 4)  # fp32 weight + Adam's two moments
    ratio = ckpt.stat().st_size / budget
    print(f"checkpoint {ckpt.stat().st_size} bytes = {ratio:.3f} × (trainable × 12 bytes)")
    assert ratio <= 1.2

    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    resumed = FinSightModule(**{k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")})
    trainer = make_trainer(tmp_path / "resume", max_steps=2)
    dm = FinSightDataModule(sources=sample_sources(), tokenizer=str(tiny_model_dir), max_length=512,
                            batch_size=2, num_proc=1)
    # max_steps equals the checkpoint's step: fit restores everything and stops before training more.
    trainer.fit(resumed, datamodule=dm, ckpt_path=str(ckpt))
    assert trainer.global_step == 2
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    restored = trainer.optimizers[0].state_dict()
    for key, state in saved["optimizer_states"][0]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(restored["state"][key][moment], state[moment], rtol=0, atol=0)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == saved["lr_schedulers"][0]["last_epoch"]


def test_exported_adapter_gives_the_same_logits_with_plain_peft(tiny_model_dir, tmp_path):
    from helpers import exported_adapter, tiny_fit_args
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cli = main(tiny_fit_args(tiny_model_dir, tmp_path))
    module = cli.model.eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        ours = module(ids)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, exported_adapter(cli)).eval()
    # On an AVX512-BF16 CPU bitsandbytes would answer this eval forward through its bfloat16 packing format;
    # the comparison is of the adapter's weights, so both sides compute in float32.
    compat.bitsandbytes.keep_4bit_weights_unpacked(plain)
    with torch.no_grad():
        theirs = plain(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_export_command_writes_adapter_and_merged_model(tiny_model_dir, tmp_path):
    from helpers import tiny_fit_args
    from transformers import AutoModelForCausalLM

    cli = main(tiny_fit_args(tiny_model_dir, tmp_path))
    ckpt = newest_last_checkpoint(cli.trainer)
    adapter = main(["export", "--checkpoint", ckpt, "--output", str(tmp_path / "adapter")])
    assert (Path(adapter) / "adapter_model.safetensors").is_file()
    merged = main(["export", "--checkpoint", ckpt, "--output", str(tmp_path / "merged"), "--merged", "true",
                   "--dtype", "bfloat16"])
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_precisions_that_cast_the_4bit_model_are_refused(tiny_model_dir, datamodule, tmp_path, precision):
    module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32")
    trainer = make_trainer(tmp_path, precision=precision)
    with pytest.raises(PrecisionError, match="casts the whole model"):
        trainer.fit(module, datamodule=datamodule)


def test_validation_runs_the_head_on_trained_positions_with_the_full_logit_metrics(tiny_model_dir):
    dm = prepared_datamodule(tiny_model_dir, max_length=512, batch_size=4)
    module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32")
    module.configure_model()
    for name in dm.source_names:
        module.val_source_loss[name] = type(module.val_loss)()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    module.eval()
    head = module.model.get_base_model().get_output_embeddings()
    rows: list[int] = []
    handle = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
    batches = list(dm.val_dataloader())[:3]
    sums, counts, by_source = 0.0, 0, {}
    with torch.no_grad():
        for index, batch in enumerate(batches):
            module.validation_step(batch, index)
            handle.remove()  # full logits below, for the reference, are not counted
            loss_sum, n_tokens = token_losses(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])
            handle = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1].numel()))
            sums += float(loss_sum.sum())
            counts += int(n_tokens.sum())
            for source, s, n in zip(batch["source_index"].tolist(), loss_sum.tolist(), n_tokens.tolist()):
                total = by_source.setdefault(dm.source_names[source], [0.0, 0])
                total[0] += s
                total[1] += n
    handle.remove()
    trained = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    # After the one-time probe (one short row), the head saw exactly each batch's trained positions.
    assert rows[-len(batches):] == trained
    assert sum(trained) < sum(b["attention_mask"].sum() for b in batches)
    mean = sums / counts
    torch.testing.assert_close(module.val_loss.compute(), torch.tensor(mean), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.val_ppl.compute(), torch.tensor(mean).exp(), rtol=1e-5, atol=1e-5)
    seen = {name for name, metric in module.val_source_loss.items() if metric.update_count}
    assert seen == {name for name, (s, n) in by_source.items() if n}
    for name in seen:
        s, n = by_source[name]
        # Per-source loss: the mean of sample means weighted by their token counts, i.e. the source's token mean.
        torch.testing.assert_close(module.val_source_loss[name].compute(), torch.tensor(s / n), rtol=1e-5, atol=1e-5)
