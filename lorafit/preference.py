"""Preference training (dpo, simpo, orpo, kto): the log-prob pass, the reference, one optimizer step, eval.

The loop in `lorafit.train` stays the same; a preference run hands its steps and evals to `PreferenceSteps`, which
asks the `lorafit.objectives.Objective` for the loss and its metrics (no branching on the objective's name here).

**The reference** is the model the run started from, with one model in memory:
- ``adapter off`` when that is the starting model: a fresh adapter whose init leaves the base unchanged (default,
  gaussian: B = 0, or VeRA's b = 0, AdaLoRA's E = 0, DoRA's m = ‖W‖). Each LoRA wrapper is swapped for its base layer
  for a no-grad forward (`evaluate.adapter_disabled`) in eval mode, so dropout and gradient checkpointing are off.
- ``snapshot`` otherwise: inits that move the base (pissa, olora, loftq write the residual W − BA into the frozen
  weight), a continued adapter (`adapter.from`: the reference is base + the starting adapter, never the bare base),
  or trained token rows / modules_to_save. The trainable tensors are copied once when the model is built (before
  `--resume` loads a checkpoint, so a resumed run still holds step 0's values) and swapped in for the reference
  forward. The copy costs one adapter's memory; the swap two adapter-sized copies per micro-batch.

**precompute_reference** computes the reference's log-probs of every train and eval sequence once before the first
step and keeps them with the token cache (``$LORAFIT_CACHE/reference/KEY.pt``), keyed by the model, the adapter's
starting point and the items' token ids, so `--resume` finds them again (and recomputes them, identically, if the
cache was cleared).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit import parallel, schedule
from lorafit.errors import LorafitError
from lorafit.objectives import Objective, SeqLogps, finish_metrics, make_objective

SHOWN_METRICS = ("rewards/accuracies", "rewards/margins", "kl")  # on the progress line beside the loss


def objective_of(cfg) -> Objective:
    """The run's `Objective` from train.objective / train.preference."""
    from lorafit.config import PreferenceConfig

    p = cfg.train.preference or PreferenceConfig()
    return make_objective(cfg.train.objective, p.beta, loss=p.loss, label_smoothing=p.label_smoothing, gamma=p.gamma,
                          sft_weight=p.sft_weight, desirable_weight=p.desirable_weight,
                          undesirable_weight=p.undesirable_weight)


def build_data(cfg, tokenizer):
    """Train items, eval items and the audit of a preference run (`lorafit.data.preference`)."""
    from lorafit.data.preference import build_preference_datasets

    return build_preference_datasets(cfg.data, tokenizer, seed=cfg.train.seed, kto=cfg.train.objective == "kto",
                                     kl_group=cfg.train.batch_size)


def starting_adapter(cfg) -> Path | None:
    """The adapter folder of adapter.from (the run continues it: the reference is base + it), else None."""
    from lorafit.adapters.peft_io import adapter_dir_of

    return adapter_dir_of(cfg.adapter.from_) if cfg.adapter.from_ else None


# ------------------------------------------------------------------------------------------------ reference


class Reference:
    """The starting model's log-probs, computed on the training model (see the module docstring)."""

    def __init__(self, model, cfg):
        from lorafit.adapters import lora_layers

        a = cfg.adapter
        inner = parallel.unwrap(model)
        self.params = [p for p in inner.parameters() if p.requires_grad]
        in_layers = {id(p) for layer in lora_layers(inner).values() for p in layer.parameters()}
        # Trainable tensors outside the adapter layers (token rows, modules_to_save) stay on with the adapter off.
        only_layers = all(id(p) in in_layers for p in self.params)
        fresh = a.init in ("default", "gaussian") and getattr(a, "from_", None) is None
        self.mode = "adapter off" if fresh and only_layers else "snapshot"
        self.saved = [p.detach().clone() for p in self.params] if self.mode == "snapshot" else None

    @contextlib.contextmanager
    def active(self, model):
        """`model` (unwrapped) as the reference for the block: eval mode, no grad, the adapter off or step 0's."""
        from lorafit.evaluate import adapter_disabled

        was_training = model.training
        model.eval()  # no dropout; transformers checkpoints only in training mode
        try:
            with torch.no_grad():
                if self.mode == "adapter off":
                    with adapter_disabled(model):
                        yield model
                else:
                    now = [p.detach().clone() for p in self.params]
                    for p, s in zip(self.params, self.saved, strict=True):
                        p.copy_(s)
                    try:
                        yield model
                    finally:
                        for p, s in zip(self.params, now, strict=True):
                            p.copy_(s)
        finally:
            model.train(was_training)


def batch_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) of every sequence of a collated micro-batch (`collate_items`)."""
    from lorafit.loss import sequence_logps

    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    return sequence_logps(model, inputs, batch["labels"], batch["seq_index"], int(batch["n_seqs"]))


def seq_logps(objective: Objective, logps, tokens, ref, desirable) -> SeqLogps:
    """The objective's view of a micro-batch's 2P (orpo: 3P, the chosen prompts last) sequences: kto reads the
    second half as its KL pairs."""
    if objective.paired:
        p = (logps.numel() // 3) if objective.scores_prompt else logps.numel() // 2
        extra = slice(2 * p, None)
        return SeqLogps(logps[: 2 * p], tokens[: 2 * p], None if ref is None else ref[: 2 * p],
                        prompt_logps=logps[extra] if objective.scores_prompt else None,
                        prompt_tokens=tokens[extra] if objective.scores_prompt else None)
    p = logps.numel() // 2
    return SeqLogps(logps[:p], tokens[:p], None if ref is None else ref[:p], desirable,
                    logps[p:].detach(), None if ref is None else ref[p:])


# ------------------------------------------------------------------------------------------------ steps


@dataclass
class PreferenceSteps:
    """One optimizer step and one eval of a preference run; built by `lorafit.train` after the model."""

    objective: Objective
    reference: Reference | None
    train_items: list[Any]
    eval_items: list[Any]
    pad_id: int | None
    ref_cache: dict[str, torch.Tensor] = field(default_factory=dict)  # "train"/"eval": (items, 2) precomputed

    @classmethod
    def create(cls, cfg, model, tokenizer, train_items, eval_items) -> PreferenceSteps:
        if parallel.is_sharded(model):  # the reference and eval forwards run on the unwrapped model
            raise LorafitError(f"train.objective: {cfg.train.objective} does not run under FSDP yet; launch with "
                               "DDP (torchrun / accelerate launch without an FSDP config)")
        check_items_fit(train_items, cfg)
        objective = objective_of(cfg)
        reference = Reference(model, cfg) if objective.needs_reference else None
        return cls(objective, reference, train_items, eval_items, tokenizer.pad_token_id)

    def describe(self) -> str:
        o = self.objective
        ref = f", reference: {self.reference.mode}" if self.reference else ""
        pre = " (precomputed)" if self.ref_cache else ""
        return f"objective: {o.name} (beta {o.beta:g}{', ' + o.loss if o.name == 'dpo' else ''}){ref}{pre}"

    # -------------------------------------------------------------------- the reference, live or precomputed

    def _reference_logps(self, model, batch, split: str, ids: list[int]) -> torch.Tensor | None:
        if self.reference is None:
            return None
        if split in self.ref_cache:
            ref = self.ref_cache[split][ids].to(batch["input_ids"].device)  # (P, 2)
            return torch.cat([ref[:, 0], ref[:, 1]])
        with self.reference.active(parallel.unwrap(model)) as m:
            return batch_logps(m, batch)[0]

    def precompute(self, model, accelerator, cfg, batch_size: int) -> None:
        """Reference log-probs of every item, loaded from the cache or computed (main process) and saved there."""
        from lorafit.data import default_cache_dir, machine_lock

        if self.reference is None:
            return
        path = default_cache_dir() / "reference" / f"{self._cache_key(cfg)}.pt"
        if accelerator.is_main_process and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with machine_lock(path.with_suffix(".lock")):
                if not path.exists():
                    print(f"precomputing the reference's log-probs of {len(self.train_items) + len(self.eval_items):,}"
                          " items", flush=True)
                    out = {s: self._compute_reference(model, accelerator, items, batch_size)
                           for s, items in (("train", self.train_items), ("eval", self.eval_items))}
                    tmp = path.with_suffix(".tmp")
                    torch.save(out, tmp)
                    tmp.replace(path)
        accelerator.wait_for_everyone()
        self.ref_cache = torch.load(path, map_location="cpu", weights_only=True)

    def _compute_reference(self, model, accelerator, items, batch_size: int) -> torch.Tensor:
        from lorafit.data.preference import collate_items

        out = torch.zeros(len(items), 2, dtype=torch.float32)
        for start in range(0, len(items), batch_size):
            part = items[start: start + batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate_items(part, self.pad_id).items()}  # no prompts
            with accelerator.autocast(), self.reference.active(parallel.unwrap(model)) as m:
                logps = batch_logps(m, batch)[0].float().cpu()
            out[start: start + len(part)] = logps.view(2, -1).t()
        return out

    def _cache_key(self, cfg) -> str:
        from lorafit.data.preference import items_fingerprint

        frm = starting_adapter(cfg)
        frm_id = None
        if frm:
            files = sorted(frm.glob("*.safetensors"))
            frm_id = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        key = {"model": cfg.model.model_dump(mode="json"), "reference": self.reference.mode, "from": frm_id,
               "adapter": cfg.adapter.model_dump(mode="json") if self.reference.mode == "snapshot" else None,
               "seed": cfg.train.seed, "precision": cfg.train.precision,
               "train": items_fingerprint(self.train_items), "eval": items_fingerprint(self.eval_items)}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]

    # -------------------------------------------------------------------- one optimizer step

    def _terms(self, model, batch, split: str, ids: list[int], accelerator, reduce_statistic: bool):
        ref = self._reference_logps(model, batch, split, ids)
        logps, tokens = batch_logps(model, batch)
        s = seq_logps(self.objective, logps, tokens, ref, batch.get("desirable"))
        stat = self.objective.batch_statistic(s)
        value = None
        if stat is not None:
            pair = torch.stack([stat[0], stat[1]])
            if reduce_statistic:  # TRL gathers kto's KL over the processes' micro-batches
                pair = accelerator.reduce(pair, reduction="sum")
            value = (pair[0] / pair[1]).item()
        return self.objective.terms(s, value), tokens

    @staticmethod
    def _counts(batches: list[dict[str, torch.Tensor]], lengths: int, accelerator) -> tuple[int, int, int]:
        """(items, chosen answer tokens, input tokens) of this step across all processes, in one reduction."""
        items = sum(b["input_ids"].size(0) // 2 for b in batches)
        chosen = sum(int((b["labels"][: b["labels"].size(0) // 2, 1:] != -100).sum()) for b in batches)
        local = torch.tensor([items, chosen, lengths], dtype=torch.long, device=accelerator.device)
        total = accelerator.reduce(local, reduction="sum").tolist()
        return int(total[0]), int(total[1]), int(total[2])

    def step(self, run, progress, check_finite) -> dict[str, Any]:
        """One optimizer step at `progress.step` (`train._Run` holds the model, optimizer, ...); the metrics row.
        `check_finite(loss, grad_norm, step, run_dir, skip_grad)`: the loop's NaN guard."""
        from lorafit.data.preference import collate_items

        t, acc, model = run.cfg.train, run.accelerator, run.model
        epoch, step_in_epoch = divmod(progress.step, run.per_epoch)
        order = schedule.epoch_order(len(self.train_items), t.seed, epoch)
        ids = schedule.micro_batches(order, step_in_epoch, t.batch_size, t.grad_accum, acc.process_index,
                                     acc.num_processes)
        batches = [collate_items([self.train_items[i] for i in mb], self.pad_id, self.objective.scores_prompt)
                   for mb in ids]
        lengths = sum(len(s.input_ids) for mb in ids for i in mb
                      for s in (self.train_items[i].first, self.train_items[i].second))
        n_items, n_chosen, tokens = self._counts(batches, lengths, acc)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        sums: dict[str, list[torch.Tensor]] = {}
        supervised = 0
        for i, (batch, mb) in enumerate(zip(batches, ids, strict=True)):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(model):
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.autocast():
                    terms, counts = self._terms(model, batch, "train", mb, acc, reduce_statistic=True)
                loss = terms.item_loss.sum() / n_items
                if terms.nll_sum is not None and n_chosen:
                    loss = loss + terms.nll_weight * terms.nll_sum / n_chosen
                extra = run.hooks.regularizer() if last and run.hooks is not None else None
                objective = loss * acc.num_processes + (extra if extra is not None else 0)
                acc.backward(objective)
                loss_sum += loss.detach().double()
                supervised += int(counts.sum())
                for k, (s, c) in terms.stats.items():
                    acc_s = sums.setdefault(k, [torch.zeros((), dtype=torch.float64, device=acc.device)] * 2)
                    sums[k] = [acc_s[0] + s.double(), acc_s[1] + c.double()]
        grad_norm = parallel.clip_grad_norm(model, acc, t.max_grad_norm)
        run.optimizer.step()
        if run.hooks is not None:
            run.hooks.after_step(progress.step + 1)
        run.optimizer.zero_grad(set_to_none=True)
        loss_value = acc.reduce(loss_sum, reduction="sum").item()
        metrics = self._reduce_metrics(sums, acc)
        supervised = int(acc.reduce(torch.tensor(supervised, device=acc.device), reduction="sum").item())
        check_finite(loss_value, float(grad_norm), progress.step + 1, Path(run.cfg.output.dir),
                     skip_grad=acc.optimizer_step_was_skipped)
        lr = run.scheduler.get_last_lr()[0]
        if not acc.optimizer_step_was_skipped:
            run.scheduler.step()
        progress.step += 1
        progress.tokens += tokens
        progress.supervised += supervised
        return {"step": progress.step, "epoch": epoch, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": progress.tokens, "supervised_tokens": progress.supervised, **metrics}

    @staticmethod
    def _reduce_metrics(sums: dict[str, list[torch.Tensor]], acc) -> dict[str, float]:
        names = sorted(sums)
        if not names:
            return {}
        local = torch.stack([torch.stack(sums[k]) for k in names])  # (metrics, 2): sum, count
        total = acc.reduce(local, reduction="sum").tolist()
        return {k: round(v, 6) for k, v in finish_metrics({k: tuple(total[i]) for i, k in enumerate(names)}).items()}

    # -------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self, model, accelerator, batch_size: int) -> dict[str, float]:
        """Loss and metrics over the eval items (each process every world-th micro-batch), reduced across processes."""
        return evaluate_items(self, model, accelerator, self.eval_items, batch_size, "eval")


def evaluate_items(steps: PreferenceSteps, model, accelerator, items, batch_size: int, split: str) -> dict[str, float]:
    """The objective's loss (mean over items, plus the NLL term) and metrics over `items`, no gradient."""
    from lorafit.data.preference import collate_items

    world, rank = accelerator.num_processes, accelerator.process_index
    starts = list(range(0, len(items), batch_size))
    per_rank = math.ceil(len(starts) / world)
    model = parallel.unwrap(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    counts = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # items, chosen tokens
    nll = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    sums: dict[str, list[torch.Tensor]] = {}
    weight = 0.0
    for j in range(per_rank):  # the same number of forwards on every rank; a rank out of batches repeats one, unused
        k = rank + j * world
        use = k < len(starts)
        ids = list(range(starts[k if use else 0], min(starts[k if use else 0] + batch_size, len(items))))
        batch = collate_items([items[i] for i in ids], steps.pad_id, steps.objective.scores_prompt)
        batch = {key: v.to(accelerator.device) for key, v in batch.items()}
        with accelerator.autocast():
            terms, _ = steps._terms(model, batch, split, ids, accelerator, reduce_statistic=False)
        scale = 1.0 if use else 0.0  # every rank adds the same metric names, so the reductions match
        loss_sum += scale * terms.item_loss.double().sum()
        counts += scale * torch.tensor([len(ids), terms.nll_tokens], dtype=torch.float64, device=accelerator.device)
        if terms.nll_sum is not None:
            nll += scale * terms.nll_sum.double()
            weight = terms.nll_weight
        for name, (s, c) in terms.stats.items():
            acc_s = sums.setdefault(name, [torch.zeros((), dtype=torch.float64, device=accelerator.device)] * 2)
            sums[name] = [acc_s[0] + scale * s.double(), acc_s[1] + scale * c.double()]
    model.train(was_training)
    total = accelerator.reduce(torch.cat([loss_sum.view(1), counts, nll.view(1)]), reduction="sum").tolist()
    loss = total[0] / total[1] + (weight * total[3] / total[2] if total[2] else 0.0) if total[1] else float("nan")
    names = ["rewards/accuracies", "rewards/chosen", "rewards/margins", "rewards/rejected", "logps/chosen",
             "logps/rejected", "kl", "log_odds_ratio", "log_odds_chosen", "nll_loss"]
    have = [n for n in names if n in sums] if sums else []
    out = {"loss": loss, "items": int(total[1])}
    if have:
        local = torch.stack([torch.stack(sums[n]) for n in have])
        red = accelerator.reduce(local, reduction="sum").tolist()
        out.update(finish_metrics({n: tuple(red[i]) for i, n in enumerate(have)}))
    return out


def check_items_fit(train_items, cfg) -> None:
    """kto's KL needs two rows per micro-batch group; refuse a training set too small for it."""
    if cfg.train.objective == "kto" and len(train_items) < 2:
        raise LorafitError("kto needs at least 2 training rows (its KL term pairs rows of a micro-batch)")


# ------------------------------------------------------------------------------------------------ lorafit eval


@torch.no_grad()
def item_logps(model, items, pad_id: int | None, batch_size: int) -> torch.Tensor:
    """(items, 2) summed log-probs of each item's two sequences under `model` as it is now (eval mode)."""
    from lorafit.data.preference import collate_items

    device = next(model.parameters()).device
    out = torch.zeros(len(items), 2, dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        part = items[start: start + batch_size]
        batch = {k: v.to(device) for k, v in collate_items(part, pad_id).items()}
        out[start: start + len(part)] = batch_logps(model, batch)[0].double().cpu().view(2, -1).t()
    return out


def pair_summary(scores: torch.Tensor, reference: torch.Tensor | None, beta: float, desirable=None) -> dict[str, Any]:
    """`lorafit eval` figures of one model from its (items, 2) log-probs: pairs: pair accuracy (chosen's summed
    log-prob above rejected's) and mean margin; against a reference, reward accuracy and margin (β · log-ratios,
    TRL's rewards). kto rows: the mean reward of desirable and undesirable rows."""
    if desirable is not None:
        out: dict[str, Any] = {"rows": scores.size(0)}
        if reference is not None:
            r = beta * (scores[:, 0] - reference[:, 0])
            good = torch.as_tensor(desirable, dtype=torch.bool)
            out.update(reward_desirable=float(r[good].mean()), reward_undesirable=float(r[~good].mean()))
        return out
    diff = scores[:, 0] - scores[:, 1]
    out = {"pairs": scores.size(0), "pair_accuracy": float((diff > 0).double().mean()), "margin": float(diff.mean())}
    if reference is not None:
        rewards = beta * ((scores[:, 0] - reference[:, 0]) - (scores[:, 1] - reference[:, 1]))
        out.update(reward_accuracy=float((rewards > 0).double().mean()), reward_margin=float(rewards.mean()))
    return out


def evaluate_preferences(config, tokenizer, variants) -> dict[str, Any]:
    """`lorafit eval` of a preference run on its eval items: base and adapter, each its pair accuracy and margin;
    the adapter's reward accuracy against the run's reference (the base, or base + adapter.from's adapter).

    Args:
        config: the run's config (its data and objective).
        tokenizer: the run's tokenizer.
        variants: {"base", "adapter", "reference"}: (model, a context manager factory putting it in that state).

    Returns:
        {"objective", "base": {"pairs", "pair_accuracy", "margin"}, "adapter": {... + "reward_accuracy",
        "reward_margin"}} (kto rows: "rows", and the adapter's "reward_desirable" / "reward_undesirable").
    """
    _, eval_items, _ = build_data(config, tokenizer)
    if not eval_items:
        raise LorafitError("the run's eval data has no usable item (see lorafit data CONFIG)")
    objective = objective_of(config)
    desirable = [bool(it.desirable) for it in eval_items] if not objective.paired else None
    scores = {}
    for name in ("base", "adapter", "reference"):
        model, context = variants[name]
        with context():
            scores[name] = item_logps(model, eval_items, tokenizer.pad_token_id, config.train.batch_size)
    ref = scores["reference"] if objective.needs_reference else scores["base"]
    return {"objective": objective.name,
            "base": pair_summary(scores["base"], None, objective.beta, desirable),
            "adapter": pair_summary(scores["adapter"], ref, objective.beta, desirable)}


def print_preference_results(console, results: dict[str, Any], adapter: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{results['objective']} eval: base vs {adapter}")
    table.add_column("")
    table.add_column("base", justify="right")
    table.add_column("adapter", justify="right")
    b, a = results["base"], results["adapter"]
    for key, label in (("pair_accuracy", "pair accuracy (chosen above rejected)"), ("margin", "mean log-prob margin"),
                       ("reward_accuracy", "reward accuracy vs the reference"), ("reward_margin", "reward margin"),
                       ("reward_desirable", "reward, desirable rows"), ("reward_undesirable", "reward, undesirable")):
        if key in a or key in b:
            table.add_row(label, f"{b[key]:.4f}" if key in b else "—", f"{a[key]:.4f}" if key in a else "—")
    console.print(table)
