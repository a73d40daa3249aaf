"""Preference objectives as pure functions of per-sequence log-probabilities.

Every objective sees the same thing: for each sequence of a micro-batch, the sum of its completion tokens'
log-probabilities under the policy (`logps`), their number (`tokens`), and where it needs one the same sum under the
reference (`ref`). It returns `Terms`: a loss per item (a pair, or a kto row), optionally the chosen answers' summed
NLL, and metric sums. The loop turns those into one optimizer step's loss,

    loss = Σ item_loss / items + nll_weight · Σ chosen NLL / chosen tokens        (over the whole global batch)

which for a single batch is exactly TRL's `mean(losses) + weight · nll_mean`. The formulas are TRL 1.16's
(trl/trainer/dpo_trainer.py `_compute_loss`, experimental/cpo, experimental/orpo, trl/trainer/kto_trainer.py):

- dpo, Δ = (log πθ(yw) − log πref(yw)) − (log πθ(yl) − log πref(yl)):
  sigmoid  −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)       (ε = label_smoothing; conservative DPO; TRL 1.16 ignores ε here)
  ipo      (Δw/|yw| − Δl/|yl| − 1/(2β))²       (per-token means, as TRL)
  hinge    relu(1 − βΔ)
  robust   (−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)
- simpo (no reference): m = mean log πθ(yw) − mean log πθ(yl);  −(1−ε)·logσ(β(m − γ/β)) − ε·logσ(−β(m − γ/β))
- orpo (no reference): with mean log-probs pw, pl, log odds = (pw − pl) − (log(1−e^pw) − log(1−e^pl));
  NLL(chosen prompt + answer, as TRL) − β·logσ(log odds)
- kto: z = clamp(mean over the batch of log πθ(y'|x) − log πref(y'|x), 0), detached, on mismatched pairs (x, y');
  desirable 1 − σ(β(r − z)), undesirable 1 − σ(β(z − r)), r = log πθ(y|x) − log πref(y|x), weighted.

Rewards (TRL's `rewards/*`) are β·(log πθ − log πref) for dpo and kto, β·(mean) log πθ for simpo and orpo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
NEEDS_REFERENCE = {"dpo": True, "kto": True, "simpo": False, "orpo": False}
PAIRED = {"dpo": True, "simpo": True, "orpo": True, "kto": False}


@dataclass
class SeqLogps:
    """Per-sequence log-prob sums of one micro-batch.

    Paired objectives: sequences are [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}].
    kto: one sequence per row; `desirable` (n,) bool, and the mismatched (KL) sequences' sums in `kl` / `ref_kl`.
    """

    logps: torch.Tensor  # (S,) summed completion log-probs, with gradient
    tokens: torch.Tensor  # (S,) completion tokens per sequence
    ref: torch.Tensor | None = None  # (S,) the reference's sums, no gradient
    desirable: torch.Tensor | None = None  # kto: (n,) bool
    kl: torch.Tensor | None = None  # kto: (n,) policy sums on the mismatched pairs, no gradient
    ref_kl: torch.Tensor | None = None  # kto: (n,) reference sums on the mismatched pairs
    prompt_logps: torch.Tensor | None = None  # orpo: (P,) the chosen prompts' sums (its NLL covers them, as TRL's)
    prompt_tokens: torch.Tensor | None = None  # orpo: (P,)


@dataclass
class Terms:
    """What one micro-batch contributes; sums, so micro-batches and processes add up exactly."""

    item_loss: torch.Tensor  # (items,) loss per pair / per kto row
    nll_sum: torch.Tensor | None = None  # summed NLL of the chosen answers' tokens (scaled by `nll_weight`)
    nll_tokens: int = 0  # chosen answers' tokens
    nll_weight: float = 0.0
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name: (sum, count), detached


def _smoothed_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def dpo_item_losses(delta: torch.Tensor, beta: float, loss: str, label_smoothing: float,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    chosen_ratio: torch.Tensor | None = None, rejected_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO losses of `delta` = chosen log-ratio − rejected log-ratio (ipo: the two ratios and lengths)."""
    if loss == "sigmoid":
        return _smoothed_sigmoid(beta * delta, label_smoothing)
    if loss == "hinge":
        return torch.relu(1 - beta * delta)
    if loss == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    if loss == "ipo":
        mean_delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (mean_delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown dpo loss {loss!r}; use one of {', '.join(DPO_LOSSES)}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _pair_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                rejected_logps: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    n = torch.tensor(float(chosen_rewards.numel()), device=chosen_rewards.device)
    d = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
         "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
         "rewards/margins": chosen_rewards - rejected_rewards,
         "logps/chosen": chosen_logps, "logps/rejected": rejected_logps}
    return {k: (v.detach().float().sum(), n) for k, v in d.items()}


@dataclass(frozen=True)
class Objective:
    """One preference objective with its settings (plain numbers: no config object below this line)."""

    name: str  # dpo | simpo | orpo | kto
    beta: float
    loss: str = "sigmoid"
    label_smoothing: float = 0.0
    gamma: float = 0.5
    sft_weight: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return NEEDS_REFERENCE[self.name]

    @property
    def paired(self) -> bool:
        return PAIRED[self.name]

    @property
    def scores_prompt(self) -> bool:
        """orpo's NLL term covers the chosen prompt too (TRL: "computed over the full prompt and response")."""
        return self.name == "orpo"

    def batch_statistic(self, s: SeqLogps) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum, count) of a batch-wide value the loss needs, reduced across processes by the caller; kto: its KL."""
        if self.name != "kto":
            return None
        return (s.kl - s.ref_kl).detach().float().sum(), torch.tensor(float(s.kl.numel()), device=s.kl.device)

    def terms(self, s: SeqLogps, statistic: float | None = None) -> Terms:
        """The micro-batch's `Terms`; `statistic`: the reduced `batch_statistic` (kto's KL before clamping)."""
        if self.name == "kto":
            return self._kto(s, statistic)
        p = s.logps.numel() // 2
        chosen, rejected = s.logps[:p], s.logps[p:]
        nc, nr = s.tokens[:p].to(chosen.dtype), s.tokens[p:].to(chosen.dtype)
        nll = -chosen.sum()  # the chosen answers' tokens' NLL, summed
        if self.name == "dpo":
            out = self._dpo(chosen, rejected, s.ref[:p], s.ref[p:], nc, nr)
        elif self.name == "simpo":
            margin = chosen / nc.clamp(min=1) - rejected / nr.clamp(min=1) - self.gamma / self.beta
            loss = _smoothed_sigmoid(self.beta * margin, self.label_smoothing)
            mc, mr = chosen / nc.clamp(min=1), rejected / nr.clamp(min=1)
            out = Terms(loss, stats=_pair_stats(self.beta * mc, self.beta * mr, mc, mr))
        elif self.name == "orpo":
            out = self._orpo(chosen, rejected, nc, nr)
        else:
            raise ValueError(f"unknown objective {self.name!r}")
        weight = 1.0 if self.name == "orpo" else self.sft_weight
        nll_tokens = int(nc.sum())
        if s.prompt_logps is not None:
            nll, nll_tokens = nll - s.prompt_logps.sum(), nll_tokens + int(s.prompt_tokens.sum())
        if weight:
            out.nll_sum, out.nll_tokens, out.nll_weight = nll, nll_tokens, weight
            out.stats["nll_loss"] = (nll.detach().float(), torch.tensor(float(nll_tokens), device=nll.device))
        return out

    def _dpo(self, chosen, rejected, ref_chosen, ref_rejected, nc, nr) -> Terms:
        cr, rr = chosen - ref_chosen, rejected - ref_rejected  # log-ratios
        loss = dpo_item_losses(cr - rr, self.beta, self.loss, self.label_smoothing, nc, nr, cr, rr)
        return Terms(loss, stats=_pair_stats(self.beta * cr, self.beta * rr, chosen, rejected))

    def _orpo(self, chosen, rejected, nc, nr) -> Terms:
        mc, mr = (chosen / nc.clamp(min=1)).float(), (rejected / nr.clamp(min=1)).float()
        log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
        ratio = F.logsigmoid(log_odds)
        stats = _pair_stats(self.beta * mc, self.beta * mr, mc, mr)
        n = stats["rewards/chosen"][1]
        stats["log_odds_ratio"] = (ratio.detach().sum(), n)
        stats["log_odds_chosen"] = (log_odds.detach().sum(), n)
        return Terms(-self.beta * ratio, stats=stats)

    def _kto(self, s: SeqLogps, kl_mean: float | None) -> Terms:
        z = max(kl_mean or 0.0, 0.0)  # clamped at 0, a constant: no gradient flows through the KL estimate
        good = s.desirable.bool()
        ratio = s.logps - s.ref
        loss = torch.where(good, self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - z))),
                           self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z - ratio))))
        rewards = (self.beta * ratio).detach().float()
        n_good, n_bad = good.sum().float(), (~good).sum().float()
        lp = s.logps.detach().float()
        stats = {"rewards/chosen": (rewards[good].sum(), n_good), "rewards/rejected": (rewards[~good].sum(), n_bad),
                 "logps/chosen": (lp[good].sum(), n_good), "logps/rejected": (lp[~good].sum(), n_bad),
                 "kl": (torch.tensor(z, device=lp.device) * s.logps.numel(), torch.tensor(float(s.logps.numel()),
                                                                                        device=lp.device))}
        return Terms(loss, stats=stats)


def finish_metrics(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Metric means from their reduced (sum, count); kto's rewards/margins as TRL derives it."""
    out = {k: s / c for k, (s, c) in sums.items() if c}
    if "rewards/margins" not in sums and "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def make_objective(name: str, beta: float | None = None, **settings) -> Objective:
    """An `Objective` with beta defaulting to the objective's usual value (`DEFAULT_BETA`)."""
    return Objective(name, DEFAULT_BETA[name] if beta is None else beta, **settings)
