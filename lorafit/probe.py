"""The gradient probe: how much each candidate target's weight is asked to change by data.train, measured on the
frozen base before training (`lorafit probe`, and `adapter.allocate: gradient` at train start).

What is measured. For a linear target with weight W (out, in), the gradient of the mean token loss over the probed
batches is G = ∂L/∂W = Σ_t δ_t x_tᵀ (out, in). Rather than G itself, the probe measures a random projection of
it: a LoRA of rank k (`PROBE_RANK`) is attached with A ~ N(0, 1/k²) (fixed by the seed) and B = 0, so the model
computes exactly what the base does, and the gradient reaching B is

    ∂L/∂B = s · G Aᵀ        (out, k),  s = alpha / k = 1

Since E[Aᵀ A] = k · (1/k²) · I = I / k, E‖G Aᵀ‖²_F = ‖G‖²_F / k: k · ‖∂L/∂B‖²_F is an unbiased estimate of
‖G‖²_F (a Johnson-Lindenstrauss sketch; its relative spread shrinks as k and G's effective rank grow).

Why the projection and not the full gradient: it is what a 4/8-bit base allows (a quantized weight has no gradient,
and a dequantized copy of every target would cost the whole model again), it costs what a rank-k LoRA costs
(k · (in + out) per target, no (out, in) gradient buffers: 16 GB more on an 8B model in bf16), it runs through
the same adapter layers training uses on every kind of base, and under DDP only the small B gradients are summed
across processes (the sum of gradients, so every process computes the same scores as one large batch would).

Normalising across shapes. A wider matrix has more entries, so ‖G‖_F grows with its size even when each weight is
asked to move as much. The score is the root-mean-square gradient per weight entry,

    score = sqrt(k · ‖∂L/∂B‖²_F / (in · out))

and `adapters.placement.allocation` gives ranks proportional to it (equal scores: uniform r).

Deterministic for a seed: the batches are the first `batches` micro-batches of epoch 0's order for train.seed
(`schedule.epoch_order`), A comes from that seed, and dropout is off.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

PROBE_RANK = 16


@dataclass
class ProbeResult:
    """The probe's measurements and the allocation they give."""

    scores: dict[str, float]  # shape-normalised, by module name, model order
    shapes: dict[str, tuple[int, int]]  # (in_features, out_features)
    allocation: dict[str, tuple[int, float]]  # kept modules: (rank, alpha)
    budget: int  # trainable parameters of uniform r on the candidates
    allocated: int  # trainable parameters of the allocation
    r: int
    batches: int
    tokens: int  # supervised tokens probed (all processes)
    seconds: float = 0.0
    frozen_a: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def rank(self, name: str) -> int:
        return self.allocation.get(name, (0, 0.0))[0]

    def as_allocation(self) -> dict[str, list]:
        """{module: [r, alpha]} for every scored module (r = 0: left out), as `placement.place` reads it."""
        return {n: list(self.allocation.get(n, (0, 0.0))) for n in self.scores}

    def to_json(self) -> dict[str, Any]:
        """``{"modules": {name: {"score", "rank", "alpha", "shape": [out, in]}}, "budget", ...}``."""
        modules = {n: {"score": s, "rank": self.rank(n), "alpha": self.allocation.get(n, (0, None))[1],
                       "shape": [self.shapes[n][1], self.shapes[n][0]]} for n, s in self.scores.items()}
        return {"modules": modules, "budget": self.budget, "allocated": self.allocated, "r": self.r,
                "batches": self.batches, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "estimator": f"random projection, rank {PROBE_RANK}", **self.meta}


# ----------------------------------------------------------------------------------------------- measuring


def probe_batches(rows, n_batches: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                  pad_id: int = 0, flatten: bool = False) -> list[dict[str, torch.Tensor]]:
    """This process's share of the first `n_batches` micro-batches training reads (epoch 0's order)."""
    from lorafit import schedule
    from lorafit.data import collate

    order = schedule.epoch_order(len(rows), seed, 0)
    per_step = batch_size * world
    out = []
    for step in range(min(n_batches, math.ceil(len(rows) / per_step))):
        ids = schedule.micro_batches(order, step, batch_size, 1, rank, world)
        out += [collate([rows[i] for i in mb], pad_id=pad_id, flatten=flatten) for mb in ids if mb]
    return out


def gradient_scores(model: nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]], *, seed: int,
                    rank: int = PROBE_RANK, accelerator=None) -> tuple[dict[str, float], int]:
    """Score each module in `names` from the gradient the batches send to it (see the module docstring).

    The base is frozen while probing and left as it came (probe layers removed, requires_grad flags restored).

    Args:
        model: the frozen base (any quantization), without adapter layers.
        names: the linear modules to score.
        batches: collated micro-batches with ``labels``.
        seed: fixes the random projections.
        rank: k, the projections' rank.
        accelerator: sums gradients and token counts across processes (DDP); None: one process.

    Returns:
        ({module: score}, supervised tokens over all processes).

    Raises:
        DataError: the batches hold no supervised token.
    """
    from lorafit.adapters import lora_layers, unwrap_lora, wrap_module
    from lorafit.errors import DataError
    from lorafit.loss import chunked_causal_lm_loss

    device = next(model.parameters()).device
    tokens = _reduce(torch.tensor([float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))],
                     device=device), accelerator)
    if tokens.item() == 0:
        raise DataError("the gradient probe read no supervised token in data.train's first batches; check the "
                        "labels with lorafit data CONFIG (train_on_prompt, masking)")
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)  # the base stays frozen: only the probe's B matrices get gradients
    torch.manual_seed(seed)
    for name in names:
        layer = wrap_module(model, name, r=rank, alpha=float(rank), dropout=0.0, init="gaussian")
        layer.lora_A.weight.requires_grad_(False)  # only B's gradient is read
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            loss_sum, _ = chunked_causal_lm_loss(model, batch, labels)
            (loss_sum / tokens.item()).backward()
        layers = lora_layers(model)
        grads = [_grad(layers[n]) for n in names]
        flat = _reduce(torch.cat([g.flatten() for g in grads]), accelerator)  # the global batch's gradient
        scores, at = {}, 0
        for name, g in zip(names, grads, strict=True):
            sq = float(flat[at:at + g.numel()].double().pow(2).sum())
            at += g.numel()
            layer = layers[name]
            scores[name] = math.sqrt(rank * sq / (layer.in_features * layer.out_features))
    finally:
        unwrap_lora(model)
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return scores, int(tokens.item())


def _grad(layer) -> torch.Tensor:
    g = layer.lora_B.weight.grad
    return torch.zeros_like(layer.lora_B.weight) if g is None else g.detach().float()


def _reduce(t: torch.Tensor, accelerator) -> torch.Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return t
    return accelerator.reduce(t.float().to(accelerator.device), reduction="sum").to(t.device)  # NCCL: on the GPU


def candidate_shapes(model: nn.Module, settings: dict) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of the linear targets allocation chooses among: adapter.targets / exclude / layers.
    Fused MoE expert weights are not scored (they keep adapter.r)."""
    from lorafit.adapters import find_targets
    from lorafit.adapters.placement import filter_layers
    from lorafit.adapters.targets import is_expert_target, linear_features

    names = filter_layers(find_targets(model, settings["targets"], settings["exclude"]), settings["layers"])
    return {n: linear_features(model.get_submodule(n)) for n in names if not is_expert_target(model, n)}


def allocate(model: nn.Module, settings: dict, batches: list, *, seed: int, accelerator=None) -> ProbeResult:
    """Probe the model and allocate ranks at the budget of uniform `settings["r"]`."""
    from lorafit.adapters.placement import allocation, uniform_budget

    start = time.perf_counter()
    shapes = candidate_shapes(model, settings)
    scores, tokens = gradient_scores(model, list(shapes), batches, seed=seed, accelerator=accelerator)
    frozen_a = settings["method"] == "lora_fa"
    chosen = allocation(scores, shapes, r=settings["r"], alpha=settings["alpha"], rslora=settings["rslora"],
                        frozen_a=frozen_a)
    costs = {n: (o if frozen_a else i + o) for n, (i, o) in shapes.items()}
    return ProbeResult(scores, shapes, chosen, uniform_budget(costs, settings["r"]),
                       sum(costs[n] * ri for n, (ri, _) in chosen.items()), settings["r"],
                       len(batches), tokens, time.perf_counter() - start, frozen_a)


# ----------------------------------------------------------------------------------------------- the command


def run_probe(loaded, n_batches: int | None = None) -> ProbeResult:
    """`lorafit probe`: the base loaded as training loads it, data.train tokenized as training does, probed."""
    from lorafit.data import build_datasets
    from lorafit.model import load_model, load_tokenizer, prepare_for_kbit_training

    cfg = loaded.config
    tokenizer = load_tokenizer(cfg.model)
    train_rows, _, _ = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(cfg.model, device_map={"": device} if cfg.model.quantization else None, tokenizer=tokenizer)
    if cfg.model.quantization is None:
        model.to(device)
    prepare_for_kbit_training(model, gradient_checkpointing=cfg.train.gradient_checkpointing is True)
    n = n_batches or cfg.adapter.allocate_batches
    batches = probe_batches(train_rows, n, cfg.train.batch_size, cfg.train.seed, pad_id=tokenizer.pad_token_id)
    return allocate(model, cfg.adapter.settings(), batches, seed=cfg.train.seed)


def print_probe(console, result: ProbeResult) -> None:
    """The table: module, shape, score, rank (and alpha), then the budget line."""
    from rich.table import Table

    table = Table(title="Gradient probe", title_justify="left", box=None, padding=(0, 2))
    for col, justify in (("module", "left"), ("shape (out × in)", "right"), ("score", "right"), ("", "left"),
                         ("rank", "right"), ("alpha", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    top = max(result.scores.values()) or 1.0
    for n, s in result.scores.items():
        i, o = result.shapes[n]
        r, a = result.allocation.get(n, (0, None))
        table.add_row(n, f"{o} × {i}", f"{s:.3e}", _bar(s / top), str(r) if r else "-",
                      f"{a:g}" if a is not None else "-")
    console.print(table)
    kept = len(result.allocation)
    console.print(f"{result.batches} batches, {result.tokens} supervised tokens, {result.seconds:.1f} s; "
                  f"{kept} of {len(result.scores)} modules kept; {result.allocated:,} trainable parameters for a "
                  f"budget of {result.budget:,} (uniform r={result.r}, "
                  f"{100 * (result.allocated / result.budget - 1):+.1f}%)")


def _bar(x: float, width: int = 12) -> str:
    return "█" * max(0, round(x * width))


def write_heatmap(result: ProbeResult, path: str | Path) -> Path:
    """A layers × projections heatmap of the scores, each cell labelled with its rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lorafit.adapters.placement import layer_index, projection_name

    layers = sorted({i for n in result.scores if (i := layer_index(n)) is not None})
    projections = list(dict.fromkeys(projection_name(n) for n in result.scores))
    grid = np.full((len(layers) or 1, len(projections)), np.nan)
    ranks = {}
    for n, s in result.scores.items():
        row = layers.index(layer_index(n)) if layer_index(n) is not None else 0
        col = projections.index(projection_name(n))
        grid[row, col] = s
        ranks[row, col] = result.rank(n)
    fig, ax = plt.subplots(figsize=(1.2 * len(projections) + 2.5, 0.35 * len(grid) + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(projections)), projections, rotation=30, ha="right")
    ax.set_yticks(range(len(grid)), [str(i) for i in layers] or ["-"])
    ax.set_ylabel("layer")
    for (row, col), r in ranks.items():
        ax.text(col, row, str(r), ha="center", va="center", color="white", fontsize=7)
    fig.colorbar(im, ax=ax, label="score (RMS gradient per weight)")
    ax.set_title(f"gradient probe: score, rank in each cell (budget of uniform r={result.r})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ in a training run

ALLOCATION_FILE = "allocation.json"


def summary(result: ProbeResult) -> str:
    """One header line: what the probe took and what it chose."""
    ranks = [r for r, _ in result.allocation.values()]
    return (f"gradient probe of {result.batches} batches ({result.tokens} supervised tokens) in {result.seconds:.1f} s: "
            f"{len(ranks)} of {len(result.scores)} targets kept, ranks {min(ranks)}-{max(ranks)}, "
            f"{result.allocated:,} trainable parameters (uniform r={result.r}: {result.budget:,})")


def write_allocation(run_dir: Path, result: ProbeResult) -> None:
    """allocation.json (what `--resume` reads back) and placement.png into the run directory."""
    import json

    (Path(run_dir) / ALLOCATION_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    write_heatmap(result, Path(run_dir) / "placement.png")


def read_allocation(run_dir: Path) -> dict[str, list]:
    """{module: [r, alpha]} of every module a run's probe scored (r = 0: left out).

    Raises:
        RunDirError: the run has no readable allocation.json.
    """
    import json

    from lorafit.errors import RunDirError

    path = Path(run_dir) / ALLOCATION_FILE
    try:
        modules = json.loads(path.read_text())["modules"]
        return {n: [int(m["rank"]), float(m["alpha"] or 0.0)] for n, m in modules.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path}: cannot read the run's rank allocation ({e.__class__.__name__}: {e}); --resume "
                          f"needs it (adapter.allocate: gradient), or start the run again in a new output.dir") from None
