"""LoRA dropout fused into ``lora_A``: PEFT's numbers exactly, with less memory kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from finsight.model.lora_dropout import DropoutLoraA, fuse_lora_dropout
from finsight.model.memory import choose_memory_release

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def peft_model(base: LlamaForCausalLM, dropout: float = 0.2, fuse: bool = True) -> tuple[torch.nn.Module, int]:
    """The same LoRA model (non-zero B, so every adapter matters), with or without the fused dropout."""
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                           target_modules=TARGETS, init_lora_weights=False))
    return model, fuse_lora_dropout(model) if fuse else 0


def train_two_steps(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses of two AdamW steps at a fixed seed, and the gradients of the second."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(5)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_dropout_trains_bit_for_bit_like_peft(base):
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    plain, _ = peft_model(base, fuse=False)
    fused, count = peft_model(base)
    assert count == 2 * len(TARGETS)
    assert isinstance(fused.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"],
                      torch.nn.Identity)
    plain_losses, plain_grads = train_two_steps(plain, ids)
    fused_losses, fused_grads = train_two_steps(fused, ids)
    assert plain_losses == fused_losses
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 4 * len(TARGETS)
    assert all(torch.equal(plain_grads[n], fused_grads[n]) for n in plain_grads)
    # Dropout really acted: the same model without dropout gives another loss.
    no_dropout, _ = peft_model(base, dropout=0.0)
    assert train_two_steps(no_dropout, ids)[0][0] != plain_losses[0]


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, int]:
    """Bytes of the distinct storages a forward saves for backward, and the bytes of the bool masks among them."""
    storages: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids).logits.sum()
    kept = [t for ptr, t in storages.items() if ptr not in params]
    return (sum(t.untyped_storage().nbytes() for t in kept),
            sum(t.untyped_storage().nbytes() for t in kept if t.dtype == torch.bool))


def test_fused_dropout_keeps_masks_not_float_copies(base):
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    plain, _ = peft_model(base, fuse=False)
    fused, _ = peft_model(base)
    plain_bytes, plain_masks = saved_bytes(plain, ids)
    fused_bytes, fused_masks = saved_bytes(fused, ids)
    # The adapters' inputs: 2 layers x (6 hidden-sized + 1 intermediate-sized) per token.
    inputs = 2 * ids.numel() * (6 * 64 + 160)
    assert plain_masks == 0 and fused_masks == inputs  # one byte per adapter input element
    # PEFT keeps, per adapter, the dropped input and the float noise (8 bytes per input element); the fused
    # dropout keeps the mask and the undropped inputs, which q/k/v and gate/up share.
    assert plain_bytes - fused_bytes >= 4 * inputs


def test_fused_dropout_is_invisible_to_adapters_eval_and_merging(base, tmp_path):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    plain, _ = peft_model(base, fuse=False)
    fused, _ = peft_model(base)
    plain_state, fused_state = plain.state_dict(), fused.state_dict()
    assert plain_state.keys() == fused_state.keys()
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, fused(input_ids=ids).logits)
    # Training mode without autograd (sample generation during fit): F.dropout's own path, same draws.
    plain.train(), fused.train()
    with torch.no_grad():
        torch.manual_seed(9)
        expected = plain(input_ids=ids).logits
        torch.manual_seed(9)
        assert torch.equal(fused(input_ids=ids).logits, expected)

    fused.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    merged = copy.deepcopy(fused).eval().merge_and_unload()
    with torch.no_grad():
        reference = plain.eval()(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, reference)
        assert torch.allclose(merged(input_ids=ids).logits, reference, atol=1e-5)
    assert "dropout=0.2" in repr(fused.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"])


def test_fusing_skips_what_it_cannot_reproduce(base):
    assert peft_model(base, dropout=0.0)[1] == 0
    fused, count = peft_model(base)
    assert count > 0 and fuse_lora_dropout(fused) == 0  # idempotent
    torch.manual_seed(1)
    dora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_dropout=0.1, target_modules=TARGETS, use_dora=True))
    assert fuse_lora_dropout(dora) == 0
    assert not any(isinstance(m, DropoutLoraA) for m in dora.modules())


def test_memory_release_follows_checkpointing_unless_set():
    assert choose_memory_release("auto", True)[0] is True
    assert choose_memory_release("auto", False)[0] is False
    # bf16 activations: the page faults cost more than the heap they save, glibc's reuse stays.
    assert choose_memory_release("auto", True, True, "bfloat16") == (
        False, "auto: bfloat16 activations, where returning freed memory costs more time than it saves memory")
    assert choose_memory_release(True, False) == (True, "set in the config")
    assert choose_memory_release(False, True) == (False, "set in the config")
