"""AdaLoRA (Zhang et al. 2023): an update in SVD form whose ranks are pruned, during training, to a budget.

The math. Each wrapped layer holds a triplet per rank i: a right singular vector (row i of A), a singular value
E_i and a left singular vector (column i of B):

    y = x W^T + b + s · (dropout(x) (A ⊙ E)^T) B^T          A: (init_r, in), E: (init_r, 1), B: (out, init_r)
    s = alpha / (ranknum + 1e-5),  ranknum = init_r          (fixed: pruning zeroes E_i, the scale stays)

E starts at 0 and A, B ~ N(0, 0.02), so a fresh adapter changes nothing; ΔW = s · B (A ⊙ E) is what merging adds.
The loss gets an orthogonality term, orth_reg_weight · mean over all A and B of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F,
which keeps the triplets close to singular vectors.

Rank allocation (`RankAllocator`), after every optimizer step and before the gradients are cleared: each entry's
sensitivity |w · ∂L/∂w| is smoothed (EMA, beta1) and its uncertainty |sensitivity - EMA| too (beta2); an entry
scores EMA(sensitivity) · EMA(uncertainty), a triplet the score of E_i plus the mean scores of row i of A and
column i of B. The budget (total rank over all layers) falls from the sum of init_r to r × layers on a cubic
schedule between steps tinit and total - tfinal; every delta_t steps the lowest-scoring triplets beyond the budget
get E_i = 0. From total - tfinal on, the final pattern is re-applied after each step. Pruning runs after the
optimizer step: before it, Adam's momentum would revive pruned values and the saved (pruned) adapter would differ
from the trained model. This is PEFT's RankAllocator, step for step; its files (peft_type ADALORA, rank_pattern,
tensors ``lora_A`` / ``lora_E`` / ``lora_B`` cut to the kept triplets) are what `export_state` and `peft_config` write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.base import AdapterLayer, TrainingHooks
from lorafit.errors import LorafitError, RunDirError

KINDS = ("lora_A", "lora_B", "lora_E")


class _Factor(nn.Module):
    """Holds A or B as ``.weight``, so optimizer groups (LoRA+ puts ``lora_B.weight`` apart) name them as LoRA's."""

    def __init__(self, rows: int, cols: int, device, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, device=device, dtype=dtype))


class AdaLoraLinear(AdapterLayer):
    """A frozen linear layer plus AdaLoRA's SVD-form path (see the module docstring)."""

    method = "adalora"
    peft_type = "ADALORA"
    tensor_kinds = KINDS

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, ranknum: int | None = None,
                 dtype: torch.dtype = torch.float32):
        """Wrap `base_layer`.

        Args:
            r: this layer's number of triplets (init_r when training; a saved adapter's kept rank when loading).
            alpha: scale numerator; s = alpha / (ranknum + 1e-5), as PEFT.
            dropout: dropout probability on the adapter's input.
            ranknum: the scale's denominator, init_r (default: r).
            dtype: dtype of the adapter's parameters.
        """
        super().__init__(base_layer)
        if r < 0:
            raise LorafitError(f"AdaLoRA rank must be >= 0 (got {r})")
        self.r, self.alpha, self.ranknum = r, alpha, float(r if ranknum is None else ranknum)
        self.scale = alpha / (self.ranknum + 1e-5)
        self.lora_A = _Factor(r, self.in_features, self.device, dtype)
        self.lora_B = _Factor(self.out_features, r, self.device, dtype)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=self.device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kept: torch.Tensor | None = None  # (r,) bool: the triplets the last pruning kept (None: all)
        self.schedule: Schedule | None = None  # the run's schedule in steps, recorded in the saved adapter
        nn.init.normal_(self.lora_A.weight, std=0.02)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.finish_init()

    @classmethod
    def layer_args(cls, settings: dict) -> dict:
        return {"r": settings["adalora"]["init_r"], "alpha": settings["alpha"], "dropout": settings["dropout"]}

    @classmethod
    def param_count(cls, in_features: int, out_features: int, settings: dict) -> int:
        return settings["adalora"]["init_r"] * (in_features + out_features + 1)

    def factors(self) -> dict[str, nn.Parameter]:
        """{"lora_A": A (r, in), "lora_B": B (out, r), "lora_E": E (r, 1)}: the trainable tensors by PEFT kind."""
        return {"lora_A": self.lora_A.weight, "lora_B": self.lora_B.weight, "lora_E": self.lora_E}

    def delta(self) -> torch.Tensor:
        """ΔW = s · B (A ⊙ E), (out, in)."""
        return (self.lora_B.weight @ (self.lora_A.weight * self.lora_E)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        x_in = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        # (..., in) -> (..., r) -> (..., out): two thin matmuls, ΔW never built
        update = F.linear(F.linear(x_in, self.lora_A.weight * self.lora_E), self.lora_B.weight)
        return self.add_update(result, update, self.scale)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {kind: p.detach() for kind, p in self.factors().items()}

    def export_state(self) -> dict[str, torch.Tensor]:
        """The kept triplets only, as PEFT saves a pruned adapter (rank_pattern says which they were)."""
        state = self.adapter_state()
        if self.kept is None:
            return state
        keep = self.kept.to(state["lora_A"].device)
        return {"lora_A": state["lora_A"][keep], "lora_E": state["lora_E"][keep], "lora_B": state["lora_B"][:, keep]}

    def rank_pattern(self, init_r: int) -> list[bool]:
        """PEFT's rank_pattern entry: which of the init_r triplets the saved tensors hold."""
        if self.kept is not None:
            return [bool(k) for k in self.kept.tolist()]
        return [True] * self.r + [False] * (init_r - self.r)  # a loaded, already cut adapter: its first r

    @classmethod
    def peft_config(cls, layers: dict[str, AdapterLayer], settings: dict) -> dict:
        ada = settings["adalora"]
        init_r = int(max(layer.ranknum for layer in layers.values()))  # every layer's: the rank it started at
        sched = next((layer.schedule for layer in layers.values() if layer.schedule is not None), None)
        sched = sched or schedule_steps(ada, 1)  # never trained: a one-step schedule PEFT accepts
        return {"peft_type": "ADALORA", "init_r": init_r, "target_r": settings["r"], "tinit": sched.tinit,
                "tfinal": sched.tfinal, "deltaT": sched.delta_t, "total_step": sched.total, "beta1": ada["beta1"],
                "beta2": ada["beta2"], "orth_reg_weight": ada["orth_reg_weight"], "use_rslora": False,
                "use_dora": False, "rank_pattern": {f"{n}.lora_E": layer.rank_pattern(init_r)
                                                    for n, layer in layers.items()}}

    @classmethod
    def training_hooks(cls, layers: dict[str, AdapterLayer], settings: dict, total_steps: int) -> RankAllocator:
        ada = settings["adalora"]
        sched = schedule_steps(ada, total_steps)
        for layer in layers.values():
            layer.schedule = sched
        return RankAllocator(layers, settings["r"], sched, ada["beta1"], ada["beta2"], ada["orth_reg_weight"])

    @classmethod
    def load_peft(cls, model: nn.Module, adapter_dir, config: dict, tensors: dict[str, torch.Tensor],
                  dropout: float | None = None):
        """Attach AdaLoRA layers from a PEFT ADALORA adapter: each layer's rank is its saved tensors' (already cut
        to rank_pattern), the scale alpha / init_r as PEFT keeps it."""
        from lorafit.adapters.peft_io import AdapterSettings
        from lorafit.adapters.wrap import group_by_module, load_lora_state_dict, lora_layers, wrap_module

        where = f"{adapter_dir}/adapter_config.json"
        for key in ("init_r", "lora_alpha"):
            if not isinstance(config.get(key), int | float) or config[key] <= 0:
                raise RunDirError(f"{where}: {key} must be a positive number (got {config.get(key)!r})")
        odd = [f"{k}={config[k]!r}" for k in ("bias", "fan_in_fan_out", "modules_to_save", "use_dora")
               if config.get(k) not in (None, False, "none")]
        if odd:
            raise RunDirError(f"{where}: {', '.join(odd)} is not supported by lorafit's AdaLoRA; load it with PEFT")
        try:
            grouped = group_by_module(tensors)
        except LorafitError as e:
            raise RunDirError(f"{adapter_dir}: {e}") from None
        modules = dict(model.named_modules())
        missing = [n for n in grouped if n not in modules]
        if missing or not grouped or lora_layers(model):
            raise RunDirError(f"{adapter_dir}: " + (f"the adapter adapts {missing[0]}, which this model does not have"
                              if missing else "holds no AdaLoRA tensors" if not grouped
                              else "the model already has adapter layers; load into a fresh base model"))
        drop = float(config.get("lora_dropout") or 0.0) if dropout is None else dropout
        for p in model.parameters():
            p.requires_grad_(False)
        for name, parts in grouped.items():
            if "lora_A" not in parts:
                raise RunDirError(f"{adapter_dir}: no lora_A tensor for {name}")
            wrap_module(model, name, method="adalora", r=int(parts["lora_A"].shape[0]),
                        alpha=float(config["lora_alpha"]), dropout=drop, ranknum=int(config["init_r"]))
        try:
            load_lora_state_dict(model, {f"{n}.{k}": t for n, parts in grouped.items() for k, t in parts.items()})
        except LorafitError as e:
            raise RunDirError(f"{adapter_dir}: {e}") from None
        if config.get("total_step"):  # re-saving keeps the schedule the adapter was trained with
            sched = Schedule(int(config["total_step"]), int(config.get("tinit", 0)), int(config.get("tfinal", 0)),
                             int(config.get("deltaT", 1)))
            for layer in lora_layers(model).values():
                layer.schedule = sched
        return AdapterSettings(r=int(config.get("target_r") or config["init_r"]), alpha=float(config["lora_alpha"]),
                               dropout=drop, rslora=False, dora=False,
                               base_model_name_or_path=config.get("base_model_name_or_path"),
                               target_modules=config.get("target_modules"), wrapped=list(lora_layers(model)))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, ranknum={self.ranknum:g}, merged={self.merged}"


# ------------------------------------------------------------------------------------------ the schedule


@dataclass(frozen=True)
class Schedule:
    """AdaLoRA's schedule in optimizer steps (PEFT's total_step, tinit, tfinal, deltaT)."""

    total: int
    tinit: int
    tfinal: int
    delta_t: int


def schedule_steps(ada: dict, total_steps: int) -> Schedule:
    """`adapter.adalora`'s fractions of the run as steps: tinit and tfinal rounded down (so that at least one
    step of pruning remains), delta_t rounded and at least 1."""
    tinit = math.floor(ada["tinit"] * total_steps + 1e-9)
    tfinal = min(math.floor(ada["tfinal"] * total_steps + 1e-9), max(total_steps - tinit - 1, 0))
    return Schedule(total_steps, tinit, tfinal, max(1, round(ada["delta_t"] * total_steps)))


def budget_at(step: int, sched: Schedule, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(total rank allowed after `step`, whether to prune at this step): PEFT's cubic schedule."""
    if step <= sched.tinit:
        return init_budget, False
    if step > sched.total - sched.tfinal:
        return target_budget, True
    left = 1 - (step - sched.tinit) / (sched.total - sched.tfinal - sched.tinit)
    return int((init_budget - target_budget) * left**3 + target_budget), step % sched.delta_t == 0


# ------------------------------------------------------------------------------------------ the allocator


class RankAllocator(TrainingHooks):
    """AdaLoRA's training hooks: the orthogonality regulariser, importance scores and pruning (PEFT's
    RankAllocator and AdaLoraModel.update_and_allocate). Its state goes into every checkpoint."""

    def __init__(self, layers: dict[str, AdaLoraLinear], r: int, sched: Schedule, beta1: float, beta2: float,
                 orth_reg_weight: float):
        self.layers, self.sched = layers, sched
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.init_budget = sum(layer.r for layer in layers.values())
        self.target_budget = r * len(layers)
        self.ema_ipt: dict[str, torch.Tensor] = {}  # "<layer>.<kind>" -> EMA of |w · grad|, like the tensor
        self.ema_unc: dict[str, torch.Tensor] = {}  # its uncertainty's EMA
        self.budget = self.init_budget

    def state_bytes(self, trainable: int) -> int:
        """Two fp32 EMAs (importance, uncertainty) per trainable value, filled in once pruning starts."""
        return 8 * trainable

    def regularizer(self) -> torch.Tensor | None:
        """orth_reg_weight · mean over every A and B of ||A Aᵀ - I||_F, ||Bᵀ B - I||_F (each (r, r))."""
        if self.orth_reg_weight == 0 or not self.layers:
            return None
        terms = []
        for layer in self.layers.values():
            a, b = layer.lora_A.weight, layer.lora_B.weight
            for cov in (a @ a.T, b.T @ b):
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
        return self.orth_reg_weight * torch.stack(terms).mean()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After the optimizer step, before the gradients are cleared: score, then prune to the budget."""
        final = self.sched.total - self.sched.tfinal
        if step < final:
            self.update_importance()
            self.budget, prune = budget_at(step, self.sched, self.init_budget, self.target_budget)
            if prune:
                self.mask_to_budget(self.budget)
        elif step == final:  # the final allocation; the scores are no longer needed
            self.budget = self.target_budget
            self.mask_to_budget(self.budget)
            self.ema_ipt, self.ema_unc = {}, {}
        else:
            self._apply_kept()

    def update_importance(self) -> None:
        """EMA of each entry's sensitivity |w · grad| (beta1) and of its deviation from that EMA (beta2)."""
        for name, layer in self.layers.items():
            for kind, p in layer.factors().items():
                if p.grad is None:
                    continue
                key = f"{name}.{kind}"
                ipt = (p * p.grad).abs()
                avg = self.beta1 * self.ema_ipt.get(key, torch.zeros_like(p)) + (1 - self.beta1) * ipt
                self.ema_unc[key] = (self.beta2 * self.ema_unc.get(key, torch.zeros_like(p))
                                     + (1 - self.beta2) * (ipt - avg).abs())
                self.ema_ipt[key] = avg

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """{layer: (r,) score of each triplet}: E_i's score + (row i of A's mean score + column i of B's)."""
        def score(key):  # zero before the first update (PEFT fails there)
            if key not in self.ema_ipt:
                return torch.zeros_like(self.layers[key.rpartition(".")[0]].factors()[key.rpartition(".")[2]])
            return self.ema_ipt[key] * self.ema_unc[key]

        return {name: score(f"{name}.lora_E").view(-1) + (score(f"{name}.lora_A").mean(dim=1)
                                                            + score(f"{name}.lora_B").mean(dim=0))
                for name in self.layers}

    def mask_to_budget(self, budget: int) -> None:
        """Keep the `budget` best triplets over all layers (ties at the threshold are pruned too, as PEFT)."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item() if k > 0 else -math.inf
        for name, layer in self.layers.items():
            layer.kept = ~(scores[name] <= threshold)
        self._apply_kept()

    def _apply_kept(self) -> None:
        for layer in self.layers.values():
            if layer.kept is not None:
                layer.lora_E.masked_fill_(~layer.kept.view(-1, 1), 0.0)

    def state_dict(self) -> dict:
        def cpu(d):
            return {k: v.detach().cpu().clone() for k, v in d.items()}

        return {"ema_ipt": cpu(self.ema_ipt), "ema_unc": cpu(self.ema_unc), "budget": self.budget,
                "kept": {n: layer.kept.cpu().clone() for n, layer in self.layers.items() if layer.kept is not None}}

    def load_state_dict(self, state: dict) -> None:
        def on_device(d):
            return {k: v.to(self.layers[k.rpartition(".")[0]].device) for k, v in d.items()}

        self.ema_ipt, self.ema_unc = on_device(state["ema_ipt"]), on_device(state["ema_unc"])
        self.budget = state["budget"]
        for name, layer in self.layers.items():
            kept = state["kept"].get(name)
            layer.kept = None if kept is None else kept.to(layer.device)
