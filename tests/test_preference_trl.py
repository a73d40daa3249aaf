"""lorafit's preference losses, metrics and adapter gradients against TRL 1.16 (the independent reference).

Both sides see the same tiny Llama, the same LoRA weights (a PEFT adapter with random A and B, so the policy differs
from the reference and the losses are not trivial) and the same token ids. TRL's own loss method runs on a batch
laid out as its collator lays it out; lorafit runs its per-sequence log-prob pass (chunked head) and objective.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import build_tiny_llama

from lorafit.data.preference import PrefItem, Seq, collate_items, with_kl_partners
from lorafit.objectives import make_objective
from lorafit.preference import Reference, batch_logps, seq_logps

pytest.importorskip("trl")

R, ALPHA = 4, 12.0
RTOL = 1e-5


def _seq(prompt: list[int], answer: list[int]) -> Seq:
    ids = prompt + answer
    return Seq(ids, [-100] * len(prompt) + answer, len(prompt))


def _pairs(vocab: int, n: int = 3, seed: int = 0) -> list[PrefItem]:
    g = torch.Generator().manual_seed(seed)

    def toks(k):
        return torch.randint(5, vocab, (k,), generator=g).tolist()

    out = []
    for i in range(n):
        prompt = [1] + toks(3 + i)
        out.append(PrefItem(_seq(prompt, toks(2 + i) + [2]), _seq(prompt, toks(4 - i % 2) + [2])))
    return out


@pytest.fixture
def models(tmp_path, tiny_tokenizer):
    """(PEFT model, lorafit model) with the same random LoRA weights on q, v and down projections; dropout 0."""
    from peft import LoraConfig, get_peft_model

    from lorafit.adapters.peft_io import load_adapter

    vocab = len(tiny_tokenizer)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = get_peft_model(build_tiny_llama(vocab), config)
    theirs.save_pretrained(tmp_path / "peft")
    ours = build_tiny_llama(vocab)
    load_adapter(ours, tmp_path / "peft")
    for n, p in ours.named_parameters():
        p.requires_grad_("lora_" in n)
    return theirs, ours


def _tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = tok.eos_token
    return tok


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), report_to="none", per_device_train_batch_size=2, use_cpu=True,
               bf16=False, fp16=False, logging_steps=1, save_strategy="no", **kw)


def _pair_rows():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}] * 2)


def _right_pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


def _dpo_inputs(items: list[PrefItem]) -> dict[str, torch.Tensor]:
    """TRL DPO's collated batch: [chosen; rejected] rows, right-padded, with a completion mask."""
    seqs = [it.first for it in items] + [it.second for it in items]
    return {"input_ids": _right_pad([s.input_ids for s in seqs], 0),
            "attention_mask": _right_pad([[1] * len(s.input_ids) for s in seqs], 0),
            "completion_mask": _right_pad([[0] * s.prompt + [1] * (len(s.input_ids) - s.prompt) for s in seqs], 0)}


def _lora_grads(model) -> dict[str, torch.Tensor]:
    """Adapter gradients by module path + A/B, whichever naming (PEFT's `.default` or lorafit's) the model uses."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name and p.grad is not None:
            key = name.replace("base_model.model.", "").replace(".default", "")
            out[key] = p.grad.detach().clone()
    return out


def _ours(model, items, objective, reference=None):
    """lorafit's loss (mean over items + NLL term), metrics and gradients on one micro-batch."""
    from lorafit.objectives import finish_metrics

    model.zero_grad(set_to_none=True)
    batch = collate_items(items, pad_id=0, score_prompts=objective.scores_prompt)
    ref = None
    if objective.needs_reference:
        with reference.active(model) as m:
            ref = batch_logps(m, batch)[0]
    logps, tokens = batch_logps(model, batch)
    s = seq_logps(objective, logps, tokens, ref, batch.get("desirable"))
    stat = objective.batch_statistic(s)
    terms = objective.terms(s, None if stat is None else (stat[0] / stat[1]).item())
    loss = terms.item_loss.mean()
    if terms.nll_sum is not None:
        loss = loss + terms.nll_weight * terms.nll_sum / terms.nll_tokens
    loss.backward()
    metrics = finish_metrics({k: (float(a), float(b)) for k, (a, b) in terms.stats.items()})
    return loss.item(), metrics, _lora_grads(model)


class _Cfg:
    """What `Reference` reads of a config. init default: a fresh adapter (reference = adapter off); an init that
    moves the start away from the base (pissa, or continuing an adapter) takes a snapshot."""

    def __init__(self, init: str = "default"):
        self.adapter = type("A", (), {"init": init, "from_": None})()
        self.model = None


def _continuing(model) -> Reference:
    """The reference of a run continuing `model`'s current adapter: a snapshot of its weights now."""
    ref = Reference(model, _Cfg("pissa"))
    assert ref.mode == "snapshot"
    return ref


def _perturb(theirs, ours, seed: int = 5) -> None:
    """The same step-like change to both policies' B matrices (TRL's frozen "ref" copy untouched)."""
    g = torch.Generator().manual_seed(seed)
    ours_b = {n: p for n, p in ours.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name and ".default." in name:
                noise = torch.randn(p.shape, generator=g) * 0.05
                p.add_(noise)
                ours_b[name.replace("base_model.model.", "").replace(".default", "")].add_(noise)


def _assert_grads_equal(theirs: dict, ours: dict) -> None:
    assert theirs.keys() == ours.keys() and len(ours) == 2 * 3 * 2  # A and B of 3 targets × 2 layers
    for k in ours:  # relative to the tensor's norm: single elements near 0 differ in their 7th digit of the largest
        assert theirs[k].norm() > 0, k
        assert ((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() <= RTOL, k


PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"]


def _trl_step(trainer, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """TRL's loss on `inputs` (gradients accumulated into the model) and the metrics that step logged."""
    loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _assert_step_equals_trl(trl_loss: torch.Tensor, trl_metrics: dict, theirs_model, ours_model, items, objective,
                            metric_names, reference=None) -> None:
    """lorafit's step on the same items gives TRL's loss, the named metrics and the LoRA gradients."""
    ours_loss, ours_metrics, ours_grads = _ours(ours_model, items, objective, reference)
    assert ours_loss == pytest.approx(trl_loss.item(), rel=RTOL)
    _assert_metrics_equal(trl_metrics, ours_metrics, metric_names)
    _assert_grads_equal(_lora_grads(theirs_model), ours_grads)


def _assert_metrics_equal(theirs: dict, ours: dict, names) -> None:
    """≤ 1e-5 relative; rewards are β × a difference of two fp32 sums of ~-30, which differ in the 7th digit when
    summed in another order (measured: 4e-7), hence the absolute 1e-6 beside it."""
    for name in names:
        assert ours[name] == pytest.approx(theirs[name], rel=RTOL, abs=1e-6), name


@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_loss_metrics_and_gradients_equal_trl(tmp_path, tiny_tokenizer, models, loss, smoothing):
    from trl import DPOConfig, DPOTrainer

    theirs_model, ours_model = models
    items = _pairs(len(tiny_tokenizer))
    beta = 0.3
    trainer = DPOTrainer(model=theirs_model, args=_args(DPOConfig, tmp_path, beta=beta, loss_type=[loss],
                                                        label_smoothing=smoothing),
                         train_dataset=_pair_rows(), processing_class=_tokenizer(tiny_tokenizer))
    reference = _continuing(ours_model)  # TRL's reference for a wrapped PEFT model: a copy of its adapter now
    _perturb(theirs_model, ours_model)
    theirs_model.train()
    trl_loss, trl_metrics = _trl_step(trainer, _dpo_inputs(items))
    _assert_step_equals_trl(trl_loss, trl_metrics, theirs_model, ours_model, items,
                            make_objective("dpo", beta, loss=loss, label_smoothing=smoothing), PAIR_METRICS, reference)


def test_dpo_sigmoid_label_smoothing_is_the_conservative_dpo_formula(tiny_tokenizer, models):
    """TRL 1.16's sigmoid ignores label_smoothing; lorafit keeps cDPO's −(1−ε)logσ(βΔ) − ε·logσ(−βΔ), checked here
    against that formula on lorafit's own log-probs (the ε = 0 case equals TRL above)."""
    _, model = models
    items = _pairs(len(tiny_tokenizer))
    beta, eps = 0.3, 0.2
    batch = collate_items(items, pad_id=0)
    with torch.no_grad(), Reference(model, _Cfg()).active(model) as m:  # the base: a pair of nonzero log-ratios
        ref = batch_logps(m, batch)[0]
    with torch.no_grad():
        logps, tokens = batch_logps(model, batch)
    p = len(items)
    delta = (logps[:p] - ref[:p]) - (logps[p:] - ref[p:])
    expected = [-(1 - eps) * math.log(1 / (1 + math.exp(-beta * d))) - eps * math.log(1 / (1 + math.exp(beta * d)))
                for d in delta.tolist()]
    terms = make_objective("dpo", beta, label_smoothing=eps).terms(seq_logps(make_objective("dpo"), logps, tokens,
                                                                             ref, None))
    assert terms.item_loss.tolist() == pytest.approx(expected, rel=1e-6)


def _cpo_batch(items: list[PrefItem]) -> dict[str, torch.Tensor]:
    out = {}
    for side, seqs in (("chosen", [it.first for it in items]), ("rejected", [it.second for it in items])):
        out[f"{side}_input_ids"] = _right_pad([s.input_ids for s in seqs], 0)
        out[f"{side}_attention_mask"] = _right_pad([[1] * len(s.input_ids) for s in seqs], 0)
        out[f"{side}_labels"] = _right_pad([s.labels for s in seqs], -100)
    return out


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_simpo_equals_trl_cpo_trainer(tmp_path, tiny_tokenizer, models, sft_weight):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    theirs_model, ours_model = models
    items = _pairs(len(tiny_tokenizer), seed=1)
    trainer = CPOTrainer(model=theirs_model, args=_args(CPOConfig, tmp_path, loss_type="simpo", beta=2.0,
                                                        simpo_gamma=0.5, cpo_alpha=sft_weight, max_length=64),
                         train_dataset=_pair_rows(), processing_class=_tokenizer(tiny_tokenizer))
    theirs_model.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, _cpo_batch(items))
    trl_loss.backward()
    _assert_step_equals_trl(trl_loss, trl_metrics, theirs_model, ours_model, items,
                            make_objective("simpo", 2.0, gamma=0.5, sft_weight=sft_weight),
                            PAIR_METRICS + (["nll_loss"] if sft_weight else []))


def test_orpo_equals_trl_orpo_trainer(tmp_path, tiny_tokenizer, models):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    theirs_model, ours_model = models
    items = _pairs(len(tiny_tokenizer), seed=2)
    trainer = ORPOTrainer(model=theirs_model, args=_args(ORPOConfig, tmp_path, beta=0.25, max_length=64),
                          train_dataset=_pair_rows(), processing_class=_tokenizer(tiny_tokenizer))
    theirs_model.train()
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, _cpo_batch(items))
    trl_loss.backward()
    _assert_step_equals_trl(trl_loss, trl_metrics, theirs_model, ours_model, items, make_objective("orpo", 0.25),
                            PAIR_METRICS + ["log_odds_ratio", "log_odds_chosen", "nll_loss"])


def _kto_items(vocab: int) -> list[PrefItem]:
    pairs = _pairs(vocab, n=2, seed=3)
    rows = [PrefItem(p.first, p.first, True) for p in pairs] + [PrefItem(pairs[0].second, pairs[0].second, False),
                                                                 PrefItem(pairs[1].second, pairs[1].second, False)]
    rows = [rows[0], rows[2], rows[1], rows[3]]  # mixed labels
    return with_kl_partners(rows, group=4, max_length=64)


def _kto_inputs(items: list[PrefItem]) -> dict[str, torch.Tensor]:
    def part(seqs, prefix):
        return {f"{prefix}input_ids": _right_pad([s.input_ids for s in seqs], 0),
                f"{prefix}attention_mask": _right_pad([[1] * len(s.input_ids) for s in seqs], 0),
                f"{prefix}completion_mask": _right_pad([[0] * s.prompt + [1] * (len(s.input_ids) - s.prompt)
                                                        for s in seqs], 0)}

    return {**part([it.first for it in items], ""), **part([it.second for it in items], "KL_"),
            "label": torch.tensor([bool(it.desirable) for it in items])}


def test_kto_equals_trl_kto_trainer(tmp_path, tiny_tokenizer, models):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    theirs_model, ours_model = models
    items = _kto_items(len(tiny_tokenizer))
    rows = Dataset.from_list([{"prompt": "a b", "completion": " c", "label": i % 2 == 0} for i in range(4)])
    trainer = KTOTrainer(model=theirs_model, args=_args(KTOConfig, tmp_path, beta=0.2, desirable_weight=1.3,
                                                        undesirable_weight=0.8),
                         train_dataset=rows, processing_class=_tokenizer(tiny_tokenizer))
    reference = _continuing(ours_model)
    _perturb(theirs_model, ours_model)
    theirs_model.train()
    trl_loss, trl_metrics = _trl_step(trainer, _kto_inputs(items))
    _assert_step_equals_trl(trl_loss, trl_metrics, theirs_model, ours_model, items,
                            make_objective("kto", 0.2, desirable_weight=1.3, undesirable_weight=0.8),
                            ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                             "kl"], reference)


def test_fresh_adapter_reference_is_the_adapter_off_as_trl_with_peft_config(tmp_path, tiny_tokenizer):
    """A fresh adapter (B = 0): TRL wraps the model itself and disables the adapter for the reference; lorafit's
    reference is its adapter switched off. After a step-like change to B both give the same loss and gradients."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from lorafit.adapters.peft_io import load_adapter

    vocab = len(tiny_tokenizer)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=build_tiny_llama(vocab), args=_args(DPOConfig, tmp_path, beta=0.5),
                         peft_config=config, train_dataset=_pair_rows(), processing_class=_tokenizer(tiny_tokenizer))
    theirs = trainer.model
    assert "ref" not in theirs.peft_config  # TRL's reference here: the adapter disabled
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(tmp_path / "stepped")
    ours = build_tiny_llama(vocab)
    load_adapter(ours, tmp_path / "stepped")
    for n, p in ours.named_parameters():
        p.requires_grad_("lora_" in n)
    reference = Reference(ours, _Cfg("default"))
    assert reference.mode == "adapter off"
    items = _pairs(vocab, seed=4)
    theirs.train()
    trl_loss, _ = _trl_step(trainer, _dpo_inputs(items))
    ours_loss, _, ours_grads = _ours(ours, items, make_objective("dpo", 0.5), reference)
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the step moved the policy off the reference
    assert ours_loss == pytest.approx(trl_loss.item(), rel=RTOL)
    _assert_grads_equal(_lora_grads(theirs), ours_grads)
