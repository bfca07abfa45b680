"""``data.packing``: several conversations in one row, exact. The same tokens are trained with the same weights:
per-token losses, the optimizer step's gradient and every other conversation's logits equal those of the same
conversations unpacked, on sdpa and eager; validation is unchanged; a packed run resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import qlora_module_for_gradients, sample_sources, tensorboard_scalars, tiny_fit_args
from transformers import AutoModelForCausalLM

from finsight import FinSightDataModule, FinSightModule
from finsight.cli.lightning_cli import main
from finsight.data.batching import CONVERSATION_LENGTHS, FinSightCollator, PackingCollator, pack_into_rows
from finsight.data.chat import IGNORE_INDEX

MAX_LENGTH = 256


@pytest.fixture(scope="module")
def conversations(tiny_model_dir) -> list[dict]:
    """Twelve training rows of the bundled mixture, short and long."""
    dm = FinSightDataModule(sources=sample_sources(), tokenizer=str(tiny_model_dir), max_length=MAX_LENGTH,
                            batch_size=12, num_proc=1, packing=True)
    dm.prepare_data()
    dm.setup("fit")
    rows = dm.train_dataset.with_format(columns=["input_ids", "labels", "source_index", "sample_id"])
    lengths = dm._train_lengths
    # The six shortest and the six longest: rows that hold several conversations, and some that hold one.
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [rows[i] for i in order[:6] + order[-6:]]


def packed(conversations: list[dict], pad_token_id: int = 0) -> dict:
    return PackingCollator(pad_token_id, MAX_LENGTH)(conversations)


def segments(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, length) of every segment a packed batch holds: where position_ids restart."""
    found = []
    for row, positions in enumerate(batch["position_ids"].tolist()):
        starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
        found += [(row, a, b - a) for a, b in zip(starts, starts[1:])]
    return found


def locate(batch: dict, conversations: list[dict]) -> list[tuple[int, int]]:
    """(row, start) of each conversation in a packed batch, found by its tokens."""
    places = []
    for conversation in conversations:
        ids = list(conversation["input_ids"])
        hits = [(row, start) for row, start, length in segments(batch) if length == len(ids)
                and batch["input_ids"][row, start:start + length].tolist() == ids]
        assert hits, "a conversation is missing from the packed batch"
        places.append(hits[0])
    return places


def test_pack_into_rows_first_fit_decreasing():
    # Longest first: 250 and 200 open rows, 100 a third; 60 fits beside 100, 30 beside 200.
    assert pack_into_rows([100, 30, 200, 60, 250], 256) == [[4], [2, 1], [0, 3]]
    assert pack_into_rows([256, 1], 256) == [[0], [1]]
    assert sorted(i for row in pack_into_rows([5] * 40, 16) for i in row) == list(range(40))


def test_rows_hold_whole_conversations_within_max_length(conversations):
    batch = packed(conversations)
    width = batch["input_ids"].shape[1]
    assert "attention_mask" not in batch and width <= MAX_LENGTH
    assert batch["input_ids"].shape[0] < len(conversations)  # short ones share rows
    for (row, start), conversation in zip(locate(batch, conversations), conversations):
        n = len(conversation["input_ids"])
        assert batch["position_ids"][row, start:start + n].tolist() == list(range(n))
        # Every label keeps its meaning; the first (already untrained: the prompt) guards the boundary.
        assert batch["labels"][row, start:start + n].tolist() == [IGNORE_INDEX, *conversation["labels"][1:]]
        assert conversation["labels"][0] == IGNORE_INDEX
    assert batch[CONVERSATION_LENGTHS].tolist() == [len(c["input_ids"]) for c in conversations]
    assert batch["sample_id"].tolist() == [c["sample_id"] for c in conversations]
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert trained == sum(sum(label != IGNORE_INDEX for label in c["labels"][1:]) for c in conversations)


def trained_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[:-1][keep].float(), targets[keep], reduction="none")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_per_token_losses_and_logits_equal_the_unpacked_ones(tiny_model_dir, conversations, attention):
    """Each conversation's per-token losses in a packed row equal those of the same conversation in a padded
    batch, in float32; changing one conversation changes no other conversation's logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention,
                                                 dtype=torch.float32).eval()
    # As in training: transformers reads packing from position_ids only without a KV cache (finsight's
    # training model has use_cache off).
    tokenizer_pad = model.config.pad_token_id
    batch = packed(conversations, tokenizer_pad)
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        total_packed = total_unpacked = 0.0
        for (row, start), conversation in zip(locate(batch, conversations), conversations):
            n = len(conversation["input_ids"])
            ids = torch.tensor([conversation["input_ids"]])
            alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            mine = packed_logits[row, start:start + n]
            torch.testing.assert_close(mine, alone, rtol=1e-5, atol=1e-5)
            labels = torch.tensor(conversation["labels"])
            ours, theirs = trained_token_losses(mine, labels), trained_token_losses(alone, labels)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            total_packed, total_unpacked = total_packed + ours.sum(), total_unpacked + theirs.sum()
        torch.testing.assert_close(total_packed, total_unpacked, rtol=1e-6, atol=1e-5)

        # One conversation rewritten (same length): the others' logits do not move.
        changed = [dict(c) for c in conversations]
        changed[0]["input_ids"] = [(token + 7) % model.config.vocab_size for token in changed[0]["input_ids"]]
        other = packed(changed, tokenizer_pad)
        assert segments(other) == segments(batch)
        other_logits = model(input_ids=other["input_ids"], position_ids=other["position_ids"],
                             use_cache=False).logits
        places = locate(batch, conversations)
        for (row, start), conversation in list(zip(places, conversations))[1:]:
            n = len(conversation["input_ids"])
            torch.testing.assert_close(other_logits[row, start:start + n], packed_logits[row, start:start + n],
                                       rtol=0, atol=1e-6)


def test_the_optimizer_step_gradient_equals_the_unpacked_one(tiny_model_dir, conversations, monkeypatch):
    """The real 4-bit QLoRA training step: loss and every LoRA gradient, packed against padded."""
    from transformers import AutoTokenizer

    module = qlora_module_for_gradients(tiny_model_dir, monkeypatch)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    padded = FinSightCollator(tokenizer)(conversations)
    pack = packed(conversations, tokenizer.pad_token_id)
    assert pack["input_ids"].numel() < padded["input_ids"].numel()

    def step(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}

    loss_padded, grads_padded = step(padded)
    loss_packed, grads_packed = step(pack)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert len(grads_packed) == len(grads_padded) > 0
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grad, grads_padded[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_packed_run_trains_and_validates_like_an_unpacked_one(tiny_model_dir, tmp_path):
    """The CLI with --data.packing true: its per-step losses equal the unpacked run's, and its checkpoint
    validates to the same loss with packing on and off. (A killed packed run resumes exactly:
    tests/training/test_reliability.py.)"""
    common = ("--trainer.val_check_interval=4", "--model.lora_dropout=0.0")
    unpacked = main(tiny_fit_args(tiny_model_dir, tmp_path / "unpacked", "--trainer.max_steps=4", *common))
    straight = main(tiny_fit_args(tiny_model_dir, tmp_path / "straight", "--trainer.max_steps=4",
                                  "--data.packing=true", *common))
    losses = tensorboard_scalars(straight.trainer.log_dir, "train/loss")
    assert sorted(losses) == [0, 1, 2, 3]
    reference = tensorboard_scalars(unpacked.trainer.log_dir, "train/loss")
    assert losses == pytest.approx(reference, rel=1e-4)
    assert tensorboard_scalars(straight.trainer.log_dir, "perf/samples_per_s")  # conversations counted, also packed

    checkpoint = Path(straight.trainer.log_dir) / "checkpoints" / "last.ckpt"
    validated = {}
    for packing in ("true", "false"):
        args = [a for a in tiny_fit_args(tiny_model_dir, tmp_path / f"validate-{packing}")[1:]
                if not a.startswith(("--trainer.max_steps", "--trainer.val_check_interval"))]
        cli = main(["validate", *args, f"--data.packing={packing}", f"--ckpt_path={checkpoint}"])
        validated[packing] = float(cli.trainer.callback_metrics["val/loss"])
    assert validated["true"] == validated["false"]


def test_rows_go_in_as_one_for_flash_attention_with_the_same_step(tiny_model_dir, conversations, monkeypatch):
    """flash-attention reads packing from position_ids only in a batch of one row, so for it the packed rows go
    in as one long row. The same step on sdpa, which reads packing in either shape, proves the two shapes
    train the same (flash-attention itself needs a GPU: benchmarks/gpu_smoke.sh runs it packed)."""
    from transformers import AutoTokenizer

    module = FinSightModule(model_name=str(tiny_model_dir), compute_dtype="float32", lora_dropout=0.0)
    module.configure_model()
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    batch = packed(conversations, AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id)
    assert batch["input_ids"].shape[0] > 1
    shapes = []
    decoder = module.model.get_base_model().get_decoder()
    handle = decoder.register_forward_pre_hook(lambda mod, args, kwargs: shapes.append(kwargs["input_ids"].shape),
                                               with_kwargs=True)
    per_row = module.training_step(batch, 0)
    monkeypatch.setattr(module, "_packs_into_one_row", lambda: True)
    one_row = module.training_step(batch, 0)
    handle.remove()
    assert shapes[-2] == batch["input_ids"].shape and shapes[-1] == (1, batch["input_ids"].numel())
    torch.testing.assert_close(one_row, per_row, rtol=1e-5, atol=1e-6)
