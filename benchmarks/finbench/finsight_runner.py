"""finsight's side of the comparison: data preparation and training with its Lightning module and data module,
as the ``finsight`` command runs them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finbench.harness import (
    Settings,
    StepProbe,
    export_adapter,
    finish_run,
    folder_size,
    mark_phase,
    peak_rss_mb,
)


def finsight_datamodule(settings: Settings, tokenizer: Any, sources: list[dict], cache_dir: str,
                        fixed_order: bool) -> Any:
    """finsight's data module with the benchmark's settings; ``fixed_order`` feeds samples in dataset order."""
    from finsight.data.datamodule import FinSightDataModule

    cls = FinSightDataModule
    if fixed_order:

        class FixedOrderDataModule(FinSightDataModule):
            """Parity runs: the training split in its stored order, as TRL's sequential sampler reads it."""

            def train_sampler(self):
                # finsight's own sampler (it yields each index with its optimizer step's trained-token total,
                # which the loss divides by), drawing the dataset order instead of a seeded one.
                sampler = super().train_sampler()
                sampler._order = lambda generator: list(range(len(self.train_dataset)))
                return sampler

        cls = FixedOrderDataModule
    return cls(sources=sources, tokenizer=tokenizer, max_length=settings.max_length, batch_size=settings.batch_size,
               seed=settings.seed, num_proc=settings.num_proc, cache_dir=cache_dir, packing=settings.packing,
               batch_tokens=settings.batch_tokens)


def finsight_prepare(settings: Settings, spec: dict) -> dict:
    """Cold (fresh caches) and cached data preparation: ``prepare_data(); setup()`` as a run does."""
    from finsight.model.loading import load_tokenizer

    tokenizer = load_tokenizer(settings.model_dir)
    result: dict[str, Any] = {}
    for phase in ("cold", "cached"):
        started = time.perf_counter()
        dm = finsight_datamodule(settings, tokenizer, spec["sources"], spec["cache_dir"], fixed_order=False)
        dm.prepare_data()
        dm.setup("fit")
        result[f"{phase}_s"] = time.perf_counter() - started
    result["train_samples"] = len(dm.train_dataset)
    result["lengths"] = dm.train_dataset["length"][:]
    result["trained"] = dm.train_dataset["trained"][:]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def finsight_train(settings: Settings, spec: dict) -> dict:
    """Train with finsight's Lightning module and data module, then save a checkpoint and the adapter."""
    import lightning as L
    import torch

    from finsight.model.loading import load_tokenizer
    from finsight.training.checkpoint import AtomicCheckpointIO
    from finsight.training.module import FinSightModule
    from finsight.training.reliability import reliability_callbacks

    parity = spec["kind"] == "parity"
    steps = settings.parity_steps if parity else settings.steps
    run_dir = Path(spec["run_dir"])
    probe = StepProbe(settings.accumulate, settings.cuda, settings.seed if parity else None)

    class Probe(L.Callback):
        """Lightning's hooks around each batch: tokens before the step, time after the optimizer step."""

        def on_train_start(self, trainer, pl_module):
            probe.start(pl_module.model)
            mark_phase("first step")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            probe.batch(batch)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % settings.accumulate == 0:
                probe.step_end(float(outputs["loss"]))
                mark_phase("later steps")

        def on_validation_start(self, trainer, pl_module):
            mark_phase("validation")

    mark_phase("loading")

    tokenizer = load_tokenizer(settings.model_dir)
    dm = finsight_datamodule(settings, tokenizer, spec["sources"], spec["cache_dir"], fixed_order=parity)
    module = FinSightModule(
        model_name=settings.model_dir, quantization="nf4", double_quant=True, compute_dtype=settings.compute_dtype,
        attn_implementation="sdpa", lora_r=settings.lora_r, lora_alpha=settings.lora_alpha,
        lora_dropout=0.0 if parity else settings.lora_dropout, target_modules=list(settings.target_modules),
        gradient_checkpointing=settings.gradient_checkpointing, learning_rate=settings.learning_rate,
        release_freed_memory=settings.release_freed_memory, activation_budget_gib=settings.activation_budget_gib,
        weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
    )
    L.seed_everything(settings.seed, verbose=False)
    trainer = L.Trainer(
        accelerator="gpu" if settings.cuda else "cpu", devices=1,
        precision=settings.trainer_precision,
        max_steps=steps, max_epochs=-1, accumulate_grad_batches=settings.accumulate,
        gradient_clip_val=1.0, gradient_clip_algorithm="norm",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # A real run validates: two validation batches (the longest, at max_length) after the last step.
        num_sanity_val_steps=0, limit_val_batches=0 if parity else 2, val_check_interval=steps,
        check_val_every_n_epoch=None, default_root_dir=str(run_dir),
        # What the finsight command always adds: atomic, fsynced checkpoints and its reliability callbacks.
        plugins=[AtomicCheckpointIO()], callbacks=[*reliability_callbacks(), Probe()],
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - started
    probe.finish()
    result = finish_run(settings, probe, fit_s)
    result["trainable_parameters"] = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    result["gradient_checkpointing"] = [module.model_info.gradient_checkpointing,
                                        module.model_info.gradient_checkpointing_reason]
    result["release_freed_memory"] = [module.model_info.release_freed_memory,
                                      module.model_info.release_freed_memory_reason]
    # The training split's folder, for the sample-by-sample comparison with TRL's prepared data.
    result["prepared_dir"] = str(Path(dm.train_dataset.cache_files[0]["filename"]).parent)
    if not parity:
        ckpt = run_dir / "last.ckpt"
        mark_phase("checkpoint")
        started = time.perf_counter()
        trainer.save_checkpoint(ckpt)
        result["checkpoint_s"] = time.perf_counter() - started
        mark_phase("adapter export")
        result["checkpoint_bytes"], result["checkpoint_files"] = folder_size(ckpt)
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        result["checkpoint_has_optimizer"] = bool(checkpoint.get("optimizer_states"))
        result["checkpoint_has_scheduler"] = bool(checkpoint.get("lr_schedulers"))
        result.update(export_adapter(module.model, run_dir / "adapter"))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


