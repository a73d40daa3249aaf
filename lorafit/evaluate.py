"""Loss and perplexity on eval data; the training loop's eval and `lorafit eval` both use `evaluate_loss`."""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
def evaluate_loss(model, rows: list[Any], accelerator, batch_size: int, pad_id: int | None) -> dict[str, float]:
    """Mean token loss over `rows`, each process taking every world-th row, reduced across processes.

    Args:
        model: the (possibly wrapped) causal LM.
        rows: tokenized rows as `lorafit.data.build_datasets` returns them.
        accelerator: the run's Accelerator (device, autocast, reductions).
        batch_size: rows per forward pass.
        pad_id: the tokenizer's pad id for collation.

    Returns:
        {"loss", "perplexity", "tokens"} where tokens counts supervised tokens on all processes.
    """
    from lorafit.data import causal_lm_loss, collate

    was_training = model.training
    model.eval()
    mine = rows[accelerator.process_index:: accelerator.num_processes]
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start: start + batch_size], pad_id=pad_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = model(**batch, use_cache=False).logits
        summed, count = causal_lm_loss(logits, labels)
        loss_sum += summed.double()
        tokens += count
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    tokens = accelerator.reduce(tokens, reduction="sum")
    model.train(was_training)
    n = int(tokens.item())
    loss = loss_sum.item() / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if n else float("nan"), "tokens": n}
