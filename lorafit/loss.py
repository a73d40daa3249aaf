"""The training loss without full-vocabulary logits: score only supervised positions, a chunk at a time.

The plain path, ``causal_lm_loss(model(**batch).logits, labels)``, projects every position of every row through the
output head: a (B, T, V) tensor, copied to fp32 for the cross-entropy and kept (as log-softmax) for the backward.
For Llama-3 (V = 128,256) at 4 × 2048 tokens that is 4.2 GB of fp32 logits, more than the LoRA activations; and on
instruction data most positions are prompt tokens whose label is -100, so most of that work is thrown away.

`chunked_causal_lm_loss` instead

1. runs the (possibly DDP-wrapped) model with ``logits_to_keep=1``: the forward goes through the wrapper, so DDP
   prepares its gradient all-reduce as usual, but the head projects one position per row; a forward hook on the
   decoder (``base_model``) captures the final hidden states (B, T, H) the head would have seen;
2. keeps the n positions whose next-token label is supervised (shifted inside, as `causal_lm_loss` does);
3. projects them through the head in chunks of `chunk_tokens` rows. Each chunk's loss *and* its gradient w.r.t. the
   chunk's hidden states are computed in the forward pass (`_HeadLoss`), so the chunk's logits are freed at once;
   the backward only scales the stored (n, H) gradient. The FLOPs equal the plain path's on the kept positions (the
   head is frozen: no weight gradient) and nothing is recomputed, unlike activation checkpointing of each chunk.

The token loss itself is `lorafit.data.causal_lm_loss` (one formula, one place), fed one kept position per row.

Used only where it is exact: a model family whose forward is ``lm_head(last_hidden_state)`` (no logit scaling or
soft-capping; `SUPPORTED_MODEL_TYPES`), a head without trainable parameters, and no wrapper other than DDP (FSDP and
DeepSpeed ZeRO-3 gather the head's weights only inside their own forward). Anything else takes the plain path.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
CHUNK_LOGITS = 2**25  # logits per chunk: 128 MiB in fp32, whatever the vocabulary size

# Families whose causal-LM forward is exactly `logits = lm_head(last_hidden_state[slice])` in transformers 5.x.
# Not Gemma 2/3 (final_logit_softcapping), Cohere (logit_scale), Granite (logits_scaling): their heads rescale.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                   "phi3", "gemma", "olmo2"})


def chunked_causal_lm_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                           chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy and the number of trained tokens, as `lorafit.data.causal_lm_loss` returns.

    Args:
        model: a transformers causal LM, bare or wrapped in DistributedDataParallel.
        inputs: the model's inputs (``input_ids``, ``position_ids``, ...), without labels.
        labels: (B, T) token ids aligned with ``input_ids`` (unshifted), -100 where no loss is taken.
        chunk_tokens: positions scored per chunk; default keeps each chunk's logits near `CHUNK_LOGITS` elements.

    Returns:
        (loss summed over trained tokens as a float32 scalar, number of trained tokens).
    """
    inner = _unwrap(model)
    if inner is None or not _supported(inner):
        return _plain_loss(model, inputs, labels)
    head = inner.get_output_embeddings()
    hidden = _final_hidden(model, inner, inputs)  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1): the token each position must predict
    keep = targets != IGNORE_INDEX  # (B, T-1)
    kept_hidden = hidden[:, :-1][keep]  # (n, H)
    kept_targets = targets[keep]  # (n,)
    chunk = chunk_tokens or max(1, CHUNK_LOGITS // head.out_features)
    if kept_hidden.requires_grad and torch.is_grad_enabled():
        loss = _HeadLoss.apply(kept_hidden, kept_targets, head, chunk)
    else:  # evaluation: no gradient to keep
        with torch.no_grad():
            loss = _score_chunks(kept_hidden, kept_targets, head, chunk)
    return loss, int(keep.sum())


class _HeadLoss(torch.autograd.Function):
    """sum_chunks token_loss(head(hidden[chunk]), targets[chunk]); the gradient is taken chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)  # (n, H): d(total)/d(hidden)
        for start in range(0, hidden.size(0), chunk):
            piece = hidden[start: start + chunk].detach().requires_grad_()
            with torch.enable_grad():  # autograd is off inside Function.forward; the chunk needs its own graph
                loss = _token_loss(head(piece), targets[start: start + chunk])
            grad[start: start + chunk] = torch.autograd.grad(loss, piece)[0]
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def _score_chunks(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), chunk):
        total += _token_loss(head(hidden[start: start + chunk]), targets[start: start + chunk])
    return total


def _token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (n, V) logits against (n,) targets, through `lorafit.data.causal_lm_loss`.

    That function shifts by one inside, so each position becomes a row of two: [its logits, ignored] against
    [ignored label, its target]. `expand` makes the second logits row a view, not a copy.
    """
    from lorafit import data  # looked up per call: the one token-loss formula (tests may wrap it)

    rows = logits.unsqueeze(1).expand(-1, 2, -1)  # (n, 2, V), row t = [logits_t, logits_t]
    labels = torch.stack([torch.full_like(targets, IGNORE_INDEX), targets], dim=1)  # (n, 2)
    return data.causal_lm_loss(rows, labels)[0]


def _final_hidden(model: nn.Module, inner: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run `model` (through any DDP wrapper) and return the decoder's last hidden state, (B, T, H)."""
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = inner.base_model.register_forward_hook(grab)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)  # the head sees one position per row
    finally:
        handle.remove()
    return captured[-1]


def _unwrap(model: nn.Module) -> nn.Module | None:
    """The causal LM inside DDP (whose forward must still be called for gradient sync); None for other wrappers.

    FSDP and DeepSpeed wrappers forward attribute look-ups to the model, so `hasattr` would find a head there whose
    weights are only gathered inside the wrapper's forward: only a transformers model itself is accepted.
    """
    from torch.nn.parallel import DistributedDataParallel
    from transformers import PreTrainedModel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model if isinstance(model, PreTrainedModel) else None


def _supported(model: nn.Module) -> bool:
    """True when the chunked path is exact for this model (see the module docstring)."""
    from torch.distributed.tensor import DTensor

    head = model.get_output_embeddings()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not isinstance(head, nn.Linear) or model.base_model is model:
        return False
    params = list(head.parameters())
    # FSDP2 (fully_shard) keeps the model's class but shards its weights into DTensors outside its forward;
    # ZeRO-3 leaves empty placeholders. A trainable head would need a weight gradient the chunks do not give.
    return not any(isinstance(p, DTensor) or p.numel() == 0 or p.requires_grad for p in params)


def _plain_loss(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    from lorafit import data

    return data.causal_lm_loss(model(**inputs, use_cache=False).logits, labels)


# ------------------------------------------------------------------------------ per-sequence log-probabilities


def sequence_logps(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, seq_index: torch.Tensor,
                   n_seqs: int, chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's trained tokens, and their number: what preference losses read.

    The same route as `chunked_causal_lm_loss`: the head runs only on the positions whose next token is trained,
    a chunk at a time (`_HeadLogps`), so no (B, T, V) logits exist. Sequences may be rows of the batch or packed
    segments of rows: `seq_index` says which sequence each position's label belongs to.

    Args:
        model: a transformers causal LM, bare or wrapped in DistributedDataParallel.
        inputs: the model's inputs (``input_ids``, ``position_ids``), without labels.
        labels: (B, T) unshifted token ids, -100 where no token is scored (prompt, padding).
        seq_index: (B, T) the sequence (0..n_seqs-1) of each label position.
        n_seqs: number of sequences.

    Returns:
        ((n_seqs,) float32 summed log-probs, with gradient when the model has one; (n_seqs,) int64 token counts).
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    owner = seq_index[:, 1:][keep]  # (n,): the sequence of each kept position
    inner = _unwrap(model)
    if inner is None or not _supported(inner):
        token_logps = _plain_token_logps(model, inputs, targets, keep)
    else:
        head = inner.get_output_embeddings()
        hidden = _final_hidden(model, inner, inputs)[:, :-1][keep]  # (n, H)
        chunk = chunk_tokens or max(1, CHUNK_LOGITS // head.out_features)
        if hidden.requires_grad and torch.is_grad_enabled():
            token_logps = _HeadLogps.apply(hidden, targets[keep], head, chunk)
        else:
            with torch.no_grad():
                token_logps = _chunk_logps(hidden, targets[keep], head, chunk)
    sums = torch.zeros(n_seqs, dtype=torch.float32, device=labels.device).index_add(0, owner, token_logps)
    counts = torch.zeros(n_seqs, dtype=torch.long, device=labels.device).index_add(0, owner, torch.ones_like(owner))
    return sums, counts


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n,) log-softmax of (n, V) logits at the (n,) targets, in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


def _chunk_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int) -> torch.Tensor:
    return torch.cat([_token_logps(head(hidden[s: s + chunk]), targets[s: s + chunk])
                      for s in range(0, hidden.size(0), chunk)]) if hidden.size(0) else hidden.new_zeros(0).float()


class _HeadLogps(torch.autograd.Function):
    """Per-token log-probs through the frozen head, chunk by chunk; each token's gradient w.r.t. its own hidden state
    is taken in the forward pass (a token's log-prob depends on its hidden state only), so the backward is a
    per-token scaling of the stored (n, H) gradients by the incoming (n,) gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int) -> torch.Tensor:
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)  # (n, H): d logp_i / d hidden_i
        for start in range(0, hidden.size(0), chunk):
            piece = hidden[start: start + chunk].detach().requires_grad_()
            with torch.enable_grad():  # autograd is off inside Function.forward; the chunk needs its own graph
                logps = _token_logps(head(piece), targets[start: start + chunk])
                total = logps.sum()
            grad[start: start + chunk] = torch.autograd.grad(total, piece)[0]
            out[start: start + chunk] = logps.detach()
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype).unsqueeze(1), None, None, None


def _plain_token_logps(model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                       keep: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    return _token_logps(logits[keep], targets[keep])
