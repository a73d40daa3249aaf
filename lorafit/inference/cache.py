"""`SlotCache`: a KV cache of preallocated slots, one per running row, handed to a transformers model as its cache.

Every attention layer calls `update(key, value, layer_idx)` with the step's new keys and values (B, H, q, hd), keys
already rotated (RoPE) by the row's own positions. The engine says beforehand, in `plan`, which slot each batch row
writes, at which positions, and which slots the attention reads; with a 4-D attention mask of its own (a row sees only
its own tokens), rows of any length and age share one forward pass without padding each other's caches.

Layout per layer: (slots, H, length + 1, hd). The last column is scratch: the positions of padding tokens (a chunk
shorter than the step's widest) write there and nobody reads it. `length` grows by doubling when a row needs more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Plan:
    """One forward pass: rows (B,) the slot each batch row writes; positions (B, q) where each token goes (padding:
    the scratch column); read: the slots the attention reads (a slice when they are 0..B-1, else indices); width:
    the key columns the attention sees."""

    rows: torch.Tensor
    positions: torch.Tensor
    read: slice | torch.Tensor
    width: int


class SlotCache:
    """Keys and values of `slots` rows; see the module docstring."""

    is_compileable = False

    def __init__(self, slots: int, length: int = 256):
        self.slots, self.length = slots, length
        self.keys: list[torch.Tensor] = []  # per layer (slots, H, length + 1, hd)
        self.values: list[torch.Tensor] = []
        self.plan: Plan | None = None

    @property
    def scratch(self) -> int:
        return self.length

    def reserve(self, length: int) -> None:
        """Room for `length` tokens per slot (doubling, so growth costs O(1) per token overall)."""
        if length <= self.length:
            return
        new = max(length, 2 * self.length)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros(old.shape[0], old.shape[1], new + 1, old.shape[3])
                grown[:, :, : self.length] = old[:, :, : self.length]
                store[i] = grown
        self.length = new

    def move(self, src: int, dst: int) -> None:
        """Slot `dst` takes slot `src`'s contents (a row changing place)."""
        for tensor in (*self.keys, *self.values):
            tensor[dst] = tensor[src]

    def swap(self, a: int, b: int) -> None:
        for tensor in (*self.keys, *self.values):
            tensor[[a, b]] = tensor[[b, a]]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked only when position ids are missing; they never are
        return 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's keys and values (B, H, q, hd) where `plan` says; return what the attention reads,
        (B, H, width, hd) each."""
        if layer_idx == len(self.keys):
            shape = (self.slots, key.shape[1], self.length + 1, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        plan = self.plan
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        where = (plan.rows[:, None], slice(None), plan.positions)  # (B, q) tokens, every head
        keys[where] = key.transpose(1, 2).to(keys.dtype)  # (B, q, H, hd)
        values[where] = value.transpose(1, 2).to(values.dtype)
        return keys[plan.read, :, : plan.width], values[plan.read, :, : plan.width]
