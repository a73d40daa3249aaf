"""The chunked loss equals `causal_lm_loss` over full logits, in value and in LoRA gradients."""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch

from lorafit import data as D
from lorafit.adapters import attach_lora
from lorafit.loss import chunked_causal_lm_loss
from lorafit.model import enable_checkpointing


def packed_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows of examples of varied length, the prompt masked, one row with nothing trained (padding only)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(9):
        prompt, answer = rng.randint(2, 12), rng.randint(1, 8)
        ids = [rng.randrange(5, vocab) for _ in range(prompt + answer)]
        examples.append(D.Example(ids, [D.IGNORE_INDEX] * prompt + ids[prompt:]))
    rows = D.make_rows(examples, max_length=48, packing=True)
    prompt_only = D.Example([3, 7, 9], [D.IGNORE_INDEX] * 3)
    return D.collate([*rows, D.make_row([prompt_only])], pad_id=0)


def lora_model(tokenizer, gradient_checkpointing: bool = False):
    """The tiny Llama with LoRA on every linear layer, B random so that A's gradients are not zero."""
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(tokenizer))
    attach_lora(model, "all-linear", r=4, alpha=12)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    if gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def loss_and_grads(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss, n = loss_fn(model, inputs, batch["labels"])
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads


def full_logits_loss(model, inputs, labels):
    return D.causal_lm_loss(model(**inputs, use_cache=False).logits, labels)


@pytest.mark.parametrize("chunk_tokens", [None, 7])  # one chunk, and many uneven ones
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny_tokenizer, chunk_tokens, gradient_checkpointing):
    model = lora_model(tiny_tokenizer, gradient_checkpointing)
    batch = packed_batch(len(tiny_tokenizer))
    want, want_n, want_grads = loss_and_grads(model, batch, full_logits_loss)
    got, got_n, got_grads = loss_and_grads(
        model, batch, lambda m, i, lab: chunked_causal_lm_loss(m, i, lab, chunk_tokens=chunk_tokens))
    assert got_n == want_n == int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 0
    for name in want_grads:
        assert want_grads[name].abs().max() > 0, name  # a zero gradient would make the comparison empty
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_scaled_loss_scales_the_gradients(tiny_tokenizer):
    # the training step backpropagates loss * world / global_tokens: the stored chunk gradients must follow
    model = lora_model(tiny_tokenizer)
    batch = packed_batch(len(tiny_tokenizer), seed=3)
    _, _, plain = loss_and_grads(model, batch, lambda m, i, lab: (chunked_causal_lm_loss(m, i, lab)[0], 0))
    _, _, scaled = loss_and_grads(model, batch, lambda m, i, lab: (chunked_causal_lm_loss(m, i, lab)[0] * 0.25, 0))
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name] * 0.25, rtol=1e-5, atol=1e-7)


def test_chunked_loss_without_grad_equals_full_logits_loss(tiny_tokenizer):
    model = lora_model(tiny_tokenizer).eval()
    batch = packed_batch(len(tiny_tokenizer), seed=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        got, n = chunked_causal_lm_loss(model, inputs, batch["labels"], chunk_tokens=5)
        want, want_n = full_logits_loss(model, inputs, batch["labels"])
    assert n == want_n
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_loss_never_builds_full_logits(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    batch = packed_batch(len(tiny_tokenizer))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    rows_seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape))
    _, n = chunked_causal_lm_loss(model, inputs, batch["labels"], chunk_tokens=8)
    batch_size = batch["input_ids"].shape[0]
    assert rows_seen[0] == (batch_size, 1, 64)  # the model's own head call: one position per row
    assert [s[0] for s in rows_seen[1:]] == [8] * (n // 8) + ([n % 8] if n % 8 else [])  # then only supervised rows


def test_trainable_head_takes_the_full_logits_path(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    model.get_output_embeddings().weight.requires_grad_(True)  # chunked backward gives no weight gradient
    batch = packed_batch(len(tiny_tokenizer), seed=2)
    want, _, want_grads = loss_and_grads(model, batch, full_logits_loss)
    got, _, got_grads = loss_and_grads(model, batch, chunked_causal_lm_loss)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grads["lm_head.weight"], want_grads["lm_head.weight"], rtol=1e-5, atol=1e-5)


def test_chunked_loss_through_ddp_matches_the_bare_model(tiny_tokenizer, monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 2000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    wrapped = None
    try:
        model = lora_model(tiny_tokenizer)
        batch = packed_batch(len(tiny_tokenizer), seed=4)
        want, _, want_grads = loss_and_grads(model, batch, full_logits_loss)
        wrapped = DistributedDataParallel(model)
        calls = []
        wrapped.register_forward_pre_hook(lambda *_: calls.append(1))  # the wrapper's forward must run (grad sync)
        got, _, got_grads = loss_and_grads(wrapped, batch, chunked_causal_lm_loss)
    finally:
        # DDP's reducer holds the process group: freed after the group is destroyed, gloo's destructor can deadlock
        # (seen once in CI: ~ProcessGroupGloo waiting on a mutex). Free the wrapper first.
        del wrapped
        gc.collect()
        dist.destroy_process_group()
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads["module." + name], grad, rtol=1e-5, atol=1e-5)


class _ForwardingWrapper(torch.nn.Module):
    """Like FSDP / DeepSpeed: forwards attribute look-ups to the model it wraps."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def test_other_wrappers_take_the_full_logits_path(tiny_tokenizer):
    model = lora_model(tiny_tokenizer)
    batch = packed_batch(len(tiny_tokenizer), seed=5)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    want, _, _ = loss_and_grads(model, batch, full_logits_loss)
    got, _, _ = loss_and_grads(_ForwardingWrapper(model), batch, chunked_causal_lm_loss)
    assert seen[1] == seen[0] == batch["input_ids"].shape + (64,)  # every position projected, as the plain path does
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
