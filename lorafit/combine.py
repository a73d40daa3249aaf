"""Combining several adapters' dense updates ΔWᵢ (out, in) of one layer into one: pure functions, no I/O.

    sum    Σ wᵢ·ΔWᵢ                                     exact; what the adapters do when all are applied at once
    ties   TIES-Merging (Yadav et al. 2023): keep each ΔWᵢ's `density` share of entries with the largest magnitude,
           elect one sign per entry (the sign of the sum of the trimmed updates), and average, per entry, the
           weighted updates that agree with it (a disjoint mean: entries no update keeps stay 0)
    dare   DARE (Yu et al. 2024): drop each entry with probability 1 - density, scale the survivors by 1 / density
           (the expectation is unchanged), then Σ wᵢ·ΔWᵢ; seeded, so a merge is repeatable
    svd    Σ wᵢ·ΔWᵢ, then its best rank-R approximation (truncated SVD)

PEFT's `add_weighted_adapter` does the same (ties: magnitude trim, "total" sign election, disjoint merge; dare:
Bernoulli mask with rescale); the tests check against the definitions on hand-made updates.

`--as-adapter` writes the result as one LoRA adapter: `concat_lora` (exact, rank Σrᵢ) for sum, `truncated_svd`
(rank R, with its approximation error) otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

COMBINES = ("sum", "ties", "dare", "svd")


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ in float32."""
    total = torch.zeros_like(deltas[0], dtype=torch.float32)
    for delta, w in zip(deltas, weights, strict=True):
        total += w * delta.float()
    return total


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its int(density · numel) largest-magnitude entries set to 0 (PEFT's count)."""
    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta.clone()
    flat = delta.reshape(-1)  # (out * in,)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask[flat.abs().topk(keep, sorted=False).indices] = True
    return (flat * mask).reshape(delta.shape)


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-Merging: trim each update to `density` by magnitude, elect each entry's sign, take the disjoint mean.

    Args:
        deltas: the updates ΔWᵢ, all of one shape.
        weights: wᵢ, one per update (applied after trimming and sign election, as PEFT does).
        density: the share of entries each update keeps, in (0, 1].

    Returns:
        The combined update, float32.
    """
    trimmed = torch.stack([trim_by_magnitude(d.float(), density) for d in deltas])  # (n, out, in)
    sign = torch.sign(trimmed.sum(dim=0))  # the elected sign: that of the total trimmed mass
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)  # (n, out, in)
    w = torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * (trimmed.dim() - 1)))  # (n, 1, 1)
    summed = (trimmed * w * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp_min(1)
    return summed / count


def dare(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (survivors scaled by 1 / density), then the weighted sum.

    Args:
        deltas, weights: as `ties`.
        density: the probability an entry survives, in (0, 1].
        generator: the random source (seeded by the caller: `--seed`).

    Returns:
        The combined update, float32.
    """
    dropped = []
    for d in deltas:
        keep = torch.rand(d.shape, generator=generator) < density  # (out, in) Bernoulli(density)
        dropped.append(d.float() * keep / density)
    return weighted_sum(dropped, weights)


def combine_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], how: str, density: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One layer's combined update by `how` (one of COMBINES; svd combines as sum, the caller truncates)."""
    if how == "ties":
        return ties(deltas, weights, density)
    if how == "dare":
        return dare(deltas, weights, density, generator or torch.Generator().manual_seed(0))
    return weighted_sum(deltas, weights)


@dataclass
class LowRank:
    """One layer as LoRA factors with scale 1: ΔW ≈ B @ A."""

    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    error: float = 0.0  # ||ΔW - B A||_F / ||ΔW||_F (0 when exact)


def truncated_svd(delta: torch.Tensor, rank: int) -> LowRank:
    """The best rank-`rank` approximation of `delta` (Eckart-Young), as B = U_r·S_r and A = V_rᵀ.

    A layer smaller than `rank` is padded with zero rows / columns, so every layer has the same rank.
    """
    delta = delta.float()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
    k = min(rank, s.numel())
    b = u[:, :k] * s[:k]  # (out, k)
    a = vh[:k]  # (k, in)
    norm = torch.linalg.norm(delta)
    error = (torch.linalg.norm(s[k:]) / norm).item() if norm > 0 else 0.0  # the dropped singular values' share
    if k < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return LowRank(a.contiguous(), b.contiguous(), error)


def concat_lora(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]], rank: int | None = None) -> LowRank:
    """Σ cᵢ·Bᵢ Aᵢ as one LoRA with scale 1: A = [A₁; A₂; ...] (Σrᵢ, in), B = [c₁B₁, c₂B₂, ...] (out, Σrᵢ). Exact.

    Args:
        parts: (Aᵢ (rᵢ, in), Bᵢ (out, rᵢ), cᵢ) with cᵢ = wᵢ · scaleᵢ folded into B.
        rank: pad with zero rows / columns up to this rank (so every layer of an adapter has one rank).
    """
    a = torch.cat([p[0].float() for p in parts], dim=0)
    b = torch.cat([p[1].float() * p[2] for p in parts], dim=1)
    if rank is not None and rank > a.shape[0]:
        extra = rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    return LowRank(a.contiguous(), b.contiguous(), 0.0)
