"""`lorafit train`: build, set up, train, clean up — read top to bottom in `run_training`.

The loss of one optimizer step is normalized by the supervised tokens of the whole global batch (every micro-step
of every process), so gradient accumulation and data parallelism give the same update as one large batch:
each micro-batch contributes sum(token losses) / global_tokens, and DDP's gradient average is undone by scaling
with the world size.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafit import checkpoint, parallel, preference, runstate, schedule, vocab
from lorafit.config import Config, LoadedConfig
from lorafit.errors import LorafitError, TrainingStopped

PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


# ------------------------------------------------------------------------------------------------ set-up


def _make_accelerator(cfg: Config):
    """The run's Accelerator, and the FSDP settings when the launch asks for sharding (else None).

    Refuses, before any weight is loaded, what cannot run: a missing tracker package, fp16 on the CPU, DeepSpeed,
    and what FSDP cannot shard (`parallel.check_sharding_fits`).
    """
    from accelerate import Accelerator

    _check_trackers(cfg.train.trackers)
    sharding = parallel.requested_sharding()
    if sharding is not None:
        parallel.check_config_fits(cfg)
        parallel.take_fsdp_request_from_environment()  # lorafit shards the model itself (`parallel.shard_model`)
    precision = PRECISION[cfg.train.precision]
    if precision == "fp16" and not torch.cuda.is_available():
        raise LorafitError("train.precision: fp16 needs a CUDA GPU (no grad scaling on the CPU); use bf16 or fp32")
    # cpu=True on a machine without CUDA is what makes accelerate run torchrun's processes as gloo data parallel.
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              log_with=cfg.train.trackers or None,
                              project_dir=cfg.output.dir, step_scheduler_with_optimizer=False)
    if sharding is not None and accelerator.num_processes == 1:  # nothing to shard across
        print("note: FSDP was asked for with one process; training without it", file=sys.stderr, flush=True)
        sharding = None
    return accelerator, sharding


def _check_trackers(trackers: list[str]) -> None:
    import importlib.util

    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    missing = [t for t in trackers if importlib.util.find_spec(packages[t]) is None]
    if missing:
        raise LorafitError(f"train.trackers: {', '.join(missing)} is not installed; "
                           f"pip install {' '.join(packages[t] for t in missing)} (or remove it from train.trackers)")


def _build_model(cfg: Config, accelerator, sharding: parallel.Sharding | None, tokenizer, rows=(), placement=None):
    """Base model and LoRA layers (plus token rows and modules_to_save, `lorafit.vocab`); under FSDP, the model
    sharded across processes. `rows`: the training rows, scanned for the special tokens the data uses.
    `placement(model)`: the per-module ranks ({module: [r, alpha]}, `_placement`) measured on the prepared base, or
    None for the config's.

    Returns:
        (model, wrapped module names, parameter report taken before sharding).
    """
    from lorafit.adapters import attach_from_settings, param_report
    from lorafit.model import load_model, prepare_for_kbit_training
    from lorafit.plan import experts_header_note

    device_map = {"": accelerator.device} if cfg.model.quantization is not None else None
    model = load_model(cfg.model, device_map=device_map, tokenizer=tokenizer, for_fsdp=sharding is not None)
    if accelerator.is_main_process:
        print(f"model: {cfg.model.path} ({cfg.model.dtype}, {_attention_text(cfg, model)})", flush=True)
    prepare_for_kbit_training(model, gradient_checkpointing=_checkpointing(cfg, accelerator, sharding))
    a = cfg.adapter
    if cfg.model.quantization is not None and a.init in ("pissa", "olora", "loftq"):
        _keep_original_weights(cfg, model, tokenizer)  # these inits need W itself, not only its quantization
    # The same seed on every process: each one starts from the same adapter (FSDP shards each process's own copy)
    settings = a.settings()
    allocated = placement(model) if placement is not None else None
    if allocated is not None:
        settings["allocation"] = allocated
    torch.manual_seed(cfg.train.seed)
    plan = _token_plan(cfg, model, tokenizer, rows, sharding, accelerator)
    wrapped = attach_from_settings(model, settings) if a.from_ is None else _continue_adapter(model, a)
    vocab.attach_vocab_trainables(cfg, model, plan)
    counts = param_report(model)
    note = experts_header_note(cfg, model) if accelerator.is_main_process else None
    if note:  # a "QLoRA" MoE keeps its experts in the model dtype: say so before the run starts
        print(note, flush=True)
    if sharding is not None:
        model = parallel.shard_model(model, sharding, accelerator.device)
    return model, wrapped, counts


def _token_plan(cfg: Config, model, tokenizer, rows, sharding, accelerator) -> vocab.TokenPlan:
    """Which token rows train (`vocab.plan_token_rows`), named in the run header; refused under FSDP."""
    from lorafit.data import end_token_ids

    chat = any(s.format == "chat" for s in cfg.data.train)
    plan = vocab.plan_token_rows(cfg, model, tokenizer, rows, end_token_ids(tokenizer, cfg.data.chat_template, chat))
    if sharding is not None and (plan.ids or cfg.adapter.modules_to_save):
        raise LorafitError("FSDP: token rows and adapter.modules_to_save are not sharded by lorafit; train them "
                           "with data parallel (torchrun / the DDP launch config)" +
                           (f" (token rows: {plan.header()})" if plan.ids else ""))
    if accelerator.is_main_process and plan.header():
        print(plan.header(), flush=True)
    return plan


def _continue_adapter(model, a) -> list[str]:
    """adapter.from: the parent's layers attached with its weights copied in, trainable in place (the optimizer,
    built later, starts fresh). Returns the wrapped module names."""
    from lorafit.adapters.peft_io import adapter_dir_of, load_adapter

    return load_adapter(model, adapter_dir_of(a.from_), dropout=a.dropout, method=a.method).wrapped


def _placement(cfg: Config, accelerator, sharding, train_rows, tokenizer, run_dir: Path, resume: bool, probed: list):
    """adapter.allocate: gradient: a function of the prepared base that returns {module: [r, alpha]}, probed on
    data.train (`lorafit.probe`; under DDP every process probes its share and the gradients are summed, so all
    allocate alike; the result is appended to `probed`) or, with --resume, read back from the run's
    allocation.json, never probed again. None when allocate is none."""
    if cfg.adapter.allocate == "none":
        return None
    from lorafit import probe

    if resume:
        saved = probe.read_allocation(run_dir)
        return lambda model: saved
    if sharding is not None:
        raise LorafitError("adapter.allocate: gradient probes the whole model on every process, and FSDP shards it; "
                           "run lorafit probe CONFIG on one device and put its ranks into adapter.rank_pattern / "
                           "alpha_pattern, or train without FSDP")

    def measure(model):
        t = cfg.train
        if cfg.model.quantization is None:
            model.to(accelerator.device)  # where training will put it; a 4/8-bit base is loaded there already
        batches = probe.probe_batches(train_rows, cfg.adapter.allocate_batches, t.batch_size, t.seed,
                                      accelerator.process_index, accelerator.num_processes,
                                      pad_id=tokenizer.pad_token_id)
        result = probe.allocate(model, cfg.adapter.settings(), batches, seed=t.seed, accelerator=accelerator)
        if accelerator.is_main_process:
            print(f"placement: {probe.summary(result)}", flush=True)
        probed.append(result)
        return result.as_allocation()

    return measure


def _keep_original_weights(cfg: Config, model, tokenizer) -> None:
    """Hand the quantized target layers their full-precision weights for adapter.init (`adapters.svd_init`)."""
    from lorafit.adapters import find_targets, is_quantized
    from lorafit.adapters.svd_init import keep_original_weights
    from lorafit.model import original_weights

    modules = dict(model.named_modules())
    names = [n for n in find_targets(model, cfg.adapter.targets, cfg.adapter.exclude) if is_quantized(modules.get(n))]
    keep_original_weights(model, original_weights(cfg.model, names, tokenizer))


def _attention_text(cfg: Config, model) -> str:
    from lorafit.model import attention_in_use

    used = attention_in_use(model)
    return f"{used} attention" + (" (auto)" if cfg.model.attention == "auto" else "")


def _checkpointing(cfg: Config, accelerator, sharding: parallel.Sharding | None) -> bool:
    """train.gradient_checkpointing, with auto decided by the memory plan against this device's memory."""
    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return setting
    from lorafit.plan import GiB, checkpointing_needed, device_capacity, estimate_memory, model_shape

    shape = model_shape(cfg)
    shards = accelerator.num_processes if sharding is not None else 1
    if shape is None:
        on, why = True, "the model's memory cannot be estimated"
    else:
        capacity = device_capacity(accelerator.device)
        on = checkpointing_needed(cfg, shape, capacity, shards)
        without = sum(estimate_memory(cfg, shape, shards, checkpointing=False).values())
        why = f"estimated {without / GiB:.1f} GiB without it, device has {capacity / GiB:.1f} GiB"
    if accelerator.is_main_process:
        print(f"gradient checkpointing (auto): {'on' if on else 'off'} ({why})", flush=True)
    return on


def _build_optimizer(cfg: Config, model):
    from lorafit.adapters import param_groups

    t = cfg.train
    groups = param_groups(model, lr=t.lr, weight_decay=t.weight_decay, lora_plus_ratio=t.lora_plus_ratio)
    if t.optimizer == "adamw":
        # fused kernels for one process or DDP; FSDP hands out empty shards, which the default foreach path takes
        fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"]) \
            and not parallel.is_sharded(model)
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" and torch.cuda.is_available() \
        else bnb.optim.AdamW8bit  # paged memory exists on CUDA only
    return cls(groups, lr=t.lr, weight_decay=t.weight_decay)


def _lr_scheduler(cfg: Config, optimizer, total_steps: int):
    warm = schedule.warmup_steps(cfg.train.warmup, total_steps)
    kind = cfg.train.scheduler
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule.lr_factor(step, total_steps, warm, kind))


# ------------------------------------------------------------------------------------------------ one step


def _forward_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed token loss of one micro-batch and its number of supervised tokens.

    Only supervised positions go through the output head, a chunk at a time (`lorafit.loss`): no (B, T, V) logits.
    """
    from lorafit.loss import chunked_causal_lm_loss

    labels = batch.pop("labels")
    return chunked_causal_lm_loss(model, batch, labels)


def _count_tokens(batches: list[dict[str, torch.Tensor]], real_tokens: int, accelerator) -> tuple[int, int]:
    """(supervised, input) tokens of this step across all processes, in one reduction.

    A label at position 0 of a row has no token before it to predict it, so it is never a target.
    """
    supervised = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    local = torch.tensor([supervised, real_tokens], dtype=torch.long, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").tolist()
    return int(total[0]), int(total[1])


def _train_step(model, optimizer, batches, real_tokens: int, accelerator, max_grad_norm, hooks=None, step: int = 0):
    """One optimizer step (number `step`, from 1) over this process's micro-batches; `hooks`: the adapter method's
    additions (`lorafit.adapters.TrainingHooks`): a regulariser added to the last micro-batch's loss, and
    `after_step(step)` after the optimizer step while the gradients are still there (AdaLoRA scores them).

    Returns:
        (mean token loss, grad norm, supervised tokens, input tokens), token counts over all processes.
    """
    global_tokens, input_tokens = _count_tokens(batches, real_tokens, accelerator)
    if global_tokens == 0:
        raise LorafitError("a training batch has no supervised token; check the data audit (lorafit data CONFIG)")
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                token_loss_sum, _ = _forward_loss(model, batch)
            # DDP and FSDP average gradients over processes; scaling by world size turns that average into a sum.
            objective = token_loss_sum * accelerator.num_processes / global_tokens
            extra = hooks.regularizer() if last and hooks is not None else None
            if extra is not None:  # the same on every process (the adapter is), so the average keeps it whole
                objective = objective + extra
            accelerator.backward(objective)
            loss_sum += token_loss_sum.detach().float()
    grad_norm = parallel.clip_grad_norm(model, accelerator, max_grad_norm)
    optimizer.step()
    if hooks is not None:  # after the step (pruning before it would let Adam revive what it pruned), before zero_grad
        hooks.after_step(step)
    optimizer.zero_grad(set_to_none=True)
    loss = accelerator.reduce(loss_sum, reduction="sum").item() / global_tokens
    return loss, float(grad_norm), global_tokens, input_tokens


# ------------------------------------------------------------------------------------------------ the run


def run_training(loaded: LoadedConfig, resume: bool = False) -> Path:
    """Train the adapter `loaded.config` describes. Returns the run directory.

    Raises:
        LorafitError: bad input (config, data, run directory) — exit 2.
        TrainingStopped: interrupted by SIGINT/SIGTERM after saving a checkpoint — exit 130; or a NaN/inf loss or
            gradient — exit 1, the last good checkpoint kept.
    """
    from lorafit.adapters import training_hooks
    from lorafit.data import build_datasets
    from lorafit.model import attention_in_use
    from lorafit.reporting import RunReporter

    cfg, t = loaded.config, loaded.config.train
    accelerator, sharding = _make_accelerator(cfg)
    run_dir = Path(cfg.output.dir)
    _on_main_then_all(accelerator, runstate.check_run_dir, run_dir, cfg, resume=resume, config_path=loaded.path)
    # Data, model and targets are checked before output.dir is created: a refused start leaves nothing behind.
    tokenizer = vocab.run_tokenizer(cfg)
    preferences = t.objective != "sft"  # dpo / simpo / orpo / kto: pairs or labelled rows (lorafit.preference)
    if preferences:
        train_rows, eval_rows, audit = preference.build_data(cfg, tokenizer)
        scanned = [s for item in train_rows for s in (item.first, item.second)]  # sequences, for the token scan
    else:
        train_rows, eval_rows, audit = build_datasets(cfg.data, tokenizer, seed=t.seed)
        scanned = () if getattr(train_rows, "streaming", False) else train_rows
    probed: list = []  # adapter.allocate: the probe's result, saved once the run dir exists (sft only: config.py)
    placement = _placement(cfg, accelerator, sharding, train_rows, tokenizer, run_dir, resume, probed)
    model, wrapped, counts = _build_model(cfg, accelerator, sharding, tokenizer, placement=placement, rows=scanned)
    # Before --resume loads a checkpoint: the reference is the model as it starts (step 0's adapter).
    pref = preference.PreferenceSteps.create(cfg, model, tokenizer, train_rows, eval_rows) if preferences else None
    _seed_everything(t.seed + accelerator.process_index)  # after the adapter's init: dropout differs per process
    streaming = getattr(train_rows, "streaming", False)  # data.streaming: rows made on the fly; max_steps is set
    per_epoch = t.max_steps if streaming else \
        schedule.steps_per_epoch(len(train_rows), t.batch_size * t.grad_accum * accelerator.num_processes)
    total_steps = t.max_steps or per_epoch * t.epochs
    hooks = training_hooks(parallel.unwrap(model), cfg.adapter.settings(), total_steps)  # e.g. AdaLoRA's pruning
    disk = runstate.disk_needed(counts.trainable, t.optimizer, t.keep_checkpoints, total_steps, t.save_every,
                                method_state=hooks.state_bytes(counts.trainable))
    _on_main_then_all(accelerator, runstate.prepare_run_dir, run_dir, cfg, resume=resume, config_path=loaded.path,
                      disk=disk)
    if probed and accelerator.is_main_process:
        from lorafit.probe import write_allocation

        write_allocation(run_dir, probed[0])
    optimizer = _build_optimizer(cfg, model)  # after sharding: FSDP's parameters are the ones to optimize
    scheduler = _lr_scheduler(cfg, optimizer, total_steps)
    if sharding is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:  # already FSDP: Accelerate must not wrap it again in DDP
        optimizer = accelerator.prepare(optimizer)
    progress = checkpoint.Progress()
    if resume:
        progress = checkpoint.load_training_state(run_dir, accelerator, model, optimizer, scheduler, hooks=hooks)
        if streaming:
            train_rows.seek(progress.data)
    if pref is not None and t.preference is not None and t.preference.precompute_reference:
        pref.precompute(model, accelerator, cfg, t.batch_size)
    if t.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat(cfg.to_dict()))
    reporter = RunReporter(run_dir, accelerator, total_steps, start=progress, audit=audit, wrapped=wrapped,
                           counts=counts, sharding=sharding)
    run = _Run(cfg, accelerator, model, optimizer, scheduler, tokenizer, train_rows, eval_rows, per_epoch, reporter,
               flatten=attention_in_use(model) == "flash_attention_2",  # FA2 reads packing only from a batch of one
               hooks=hooks, pref=pref)
    if pref is not None and accelerator.is_main_process:
        print(pref.describe(), flush=True)
    stop = _install_signal_handlers()
    started = time.perf_counter() - progress.elapsed
    try:
        while progress.step < total_steps:
            row = run.step(progress)
            progress.elapsed = time.perf_counter() - started
            reporter.step(row, log=progress.step % t.log_every == 0 or progress.step == total_steps)
            if t.eval_every and progress.step % t.eval_every == 0 and progress.step < total_steps and eval_rows:
                reporter.eval(progress.step, run.evaluate())
            due = t.save_every and progress.step % t.save_every == 0 and progress.step < total_steps
            stopping = _any_process(stop.requested, accelerator)
            if due or stopping:
                progress.metrics = reporter.metrics
                checkpoint.save_training_state(run_dir, accelerator, model, optimizer, scheduler, progress,
                                               keep=t.keep_checkpoints, hooks=hooks)
            if stopping:
                raise TrainingStopped(f"interrupted at step {progress.step}: checkpoint saved; continue with "
                                      f"lorafit train {loaded.path} --resume", exit_code=130)
        # The adapter first: an interrupt during the final eval must not cost the trained run.
        runstate.save_final_adapter(run_dir, cfg, accelerator, model, tokenizer)
        if eval_rows:
            reporter.eval(progress.step, run.evaluate())
        reporter.finish(loaded.path)
        accelerator.wait_for_everyone()  # no rank tears down the process group while another still uses it
    finally:
        stop.restore()
        accelerator.end_training()
    return run_dir


@dataclass
class _Run:
    """What one optimizer step and one eval need, built once by `run_training`."""

    cfg: Config
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    train_rows: list[Any]
    eval_rows: list[Any]
    per_epoch: int
    reporter: Any
    flatten: bool = False  # collate micro-batches into one row (flash_attention_2)
    hooks: Any = None  # the adapter method's additions to the loop (lorafit.adapters.TrainingHooks)
    pref: Any = None  # a preference objective's steps and evals (lorafit.preference.PreferenceSteps)

    def step(self, progress: checkpoint.Progress) -> dict[str, Any]:
        """One optimizer step at `progress.step`; advances `progress` and returns the metrics row."""
        from lorafit.data import collate

        if self.pref is not None:
            return self.pref.step(self, progress, check_finite=_check_finite)
        t, acc = self.cfg.train, self.accelerator
        epoch, step_in_epoch = divmod(progress.step, self.per_epoch)
        if getattr(self.train_rows, "streaming", False):
            rows = self.train_rows.micro_batches(t.batch_size, t.grad_accum, acc.process_index, acc.num_processes)
            progress.data = self.train_rows.state()
        else:
            order = schedule.epoch_order(len(self.train_rows), t.seed, epoch)
            ids = schedule.micro_batches(order, step_in_epoch, t.batch_size, t.grad_accum, acc.process_index,
                                         acc.num_processes)
            rows = [[self.train_rows[i] for i in mb] for mb in ids]
        batches = [collate(mb, pad_id=self.tokenizer.pad_token_id, flatten=self.flatten) for mb in rows]
        real = sum(len(r) for mb in rows for r in mb)
        self.model.train()
        loss, grad_norm, supervised, tokens = _train_step(self.model, self.optimizer, batches, real, acc,
                                                          t.max_grad_norm, self.hooks, step=progress.step + 1)
        _check_finite(loss, grad_norm, progress.step + 1, Path(self.cfg.output.dir),
                      skip_grad=acc.optimizer_step_was_skipped)
        lr = self.scheduler.get_last_lr()[0]
        if not acc.optimizer_step_was_skipped:  # an fp16 step skipped for overflow does not advance the schedule
            self.scheduler.step()
        progress.step += 1
        progress.tokens += tokens
        progress.supervised += supervised
        return {"step": progress.step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens": progress.tokens, "supervised_tokens": progress.supervised}

    def evaluate(self) -> dict[str, float]:
        from lorafit.evaluate import evaluate_loss

        if self.pref is not None:
            return self.pref.evaluate(self.model, self.accelerator, self.cfg.train.batch_size)

        # DDP: the unwrapped model, since a DDP forward syncs buffers, which would hang a rank without eval rows.
        # FSDP: the sharded model (only its forward gathers the weights), the same number of batches on every rank.
        sharded = parallel.is_sharded(self.model)
        model = self.model if sharded else self.accelerator.unwrap_model(self.model)
        return evaluate_loss(model, self.eval_rows, self.accelerator, self.cfg.train.batch_size,
                             pad_id=self.tokenizer.pad_token_id, lockstep=sharded)


def _on_main_then_all(accelerator, fn, *args, **kwargs) -> None:
    """Run `fn` on the main process; if it raised a user error, every process raises it.

    Without this, the other processes would wait at the barrier and die with a connection error.
    """
    from accelerate.utils import broadcast_object_list

    error, message = None, [None]
    if accelerator.is_main_process:
        try:
            fn(*args, **kwargs)
        except LorafitError as e:
            error, message = e, [str(e)]
    if accelerator.num_processes > 1:
        broadcast_object_list(message, from_process=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise LorafitError(message[0])
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------ guards


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _any_process(flag: bool, accelerator) -> bool:
    """True on every process if `flag` is set on any: all ranks must save and stop at the same step."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), reduction="sum").item())


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as {"train.lr": 0.0002, ...}: trackers take flat scalar hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _check_finite(loss: float, grad_norm: float, step: int, run_dir: Path, skip_grad: bool) -> None:
    bad = "loss" if not math.isfinite(loss) else ("gradient norm" if not math.isfinite(grad_norm) and not skip_grad
                                                   else None)
    if bad is None:
        return
    last = checkpoint.newest_checkpoint(run_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    raise TrainingStopped(f"the {bad} became {loss if bad == 'loss' else grad_norm} at step {step}; stopped. "
                           f"{kept}. Resume from it with a lower rate (lorafit train CONFIG --resume train.lr=...) or "
                          f"start again with train.precision fp32", exit_code=1)


@dataclass
class _StopFlag:
    requested: bool = False
    previous: dict[int, Any] = field(default_factory=dict)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _install_signal_handlers() -> _StopFlag:
    """First SIGINT/SIGTERM: finish the step, save a checkpoint, exit 130. A second SIGINT stops at once."""
    flag = _StopFlag()

    def on_signal(signum, _frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to stop now)",
              flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            flag.previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (e.g. inside some notebook runners): no graceful stop
            pass
    return flag
