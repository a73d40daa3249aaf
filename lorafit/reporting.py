"""What a person watching a run sees: a progress bar (plain lines when not on a terminal), metrics.jsonl, the
loss plot and the closing summary. Only the main process prints or writes.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on `device`, or this process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024**2


class RunReporter:
    """Progress, metrics rows and the end-of-run summary for one training run."""

    def __init__(self, run_dir: Path, accelerator, total_steps: int, start, audit: Any, wrapped: list[str], counts,
                 sharding=None):
        from rich.console import Console

        self.run_dir = run_dir
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.total = total_steps
        self.metrics: list[dict[str, Any]] = list(start.metrics)
        self.first_step = start.step
        self.tokens_at_start = start.tokens
        self.clock = time.perf_counter()
        self.elapsed_before = start.elapsed
        self.console = Console(stderr=False, highlight=False)
        self.live = self.main and self.console.is_terminal and not os.environ.get("CI")
        self.bar = None
        if self.main:
            self._header(audit, wrapped, counts, sharding)
            if self.live:
                self._start_bar()

    def _header(self, audit: Any, wrapped: list[str], counts, sharding) -> None:
        self.console.print(f"adapter: {len(wrapped)} modules wrapped, {counts.trainable:,} trainable / "
                           f"{counts.total:,} parameters")
        n = self.accelerator.num_processes
        if n > 1 or sharding is not None:
            how = f"FSDP ({sharding.strategy.lower()})" if sharding is not None else "data parallel (DDP)"
            self.console.print(f"processes: {n}, {how}")
        if audit is not None:
            self.console.print(f"data: {audit}")
        if self.first_step:
            self.console.print(f"resuming at step {self.first_step} of {self.total}")

    def _start_bar(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console, transient=False)
        self.task = self.bar.add_task("train", total=self.total, completed=self.first_step, info="")
        self.bar.start()

    def step(self, row: dict[str, Any], log: bool) -> None:
        """Record one optimizer step; on `log` steps also append it to metrics.jsonl and print it."""
        elapsed = self.elapsed_before + time.perf_counter() - self.clock
        new_tokens = row["tokens"] - self.tokens_at_start
        row.update(elapsed=round(elapsed, 3),
                   tokens_per_s=round(new_tokens / max(time.perf_counter() - self.clock, 1e-9), 1),
                   memory_gib=round(peak_memory_gib(self.accelerator.device), 3))
        if not self.main:
            return
        shown = "".join(f"  {k.split('/')[-1]} {row[k]:.3f}" for k in ("rewards/accuracies", "rewards/margins", "kl")
                        if k in row)  # preference runs: TRL's names, shortened
        info = f"loss {row['loss']:.4f}{shown}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s  {row['memory_gib']:.2f} GiB"
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], info=info)
        if log:
            self._append(row)
            if self.bar is None:
                print(f"step {row['step']}/{self.total}  {info}", flush=True)

    def eval(self, step: int, result: dict[str, float]) -> None:
        if "perplexity" not in result:  # a preference run: its loss and TRL's metrics, as eval_<name>
            row = {"step": step, **{f"eval_{k}": v for k, v in result.items()}}
            if self.main:
                self._append(row)
                acc = f"  reward accuracy {result['rewards/accuracies']:.3f}" if "rewards/accuracies" in result else ""
                msg = f"eval at step {step}: loss {result['loss']:.4f}{acc}"
                (self.bar.console.print if self.bar is not None else print)(msg)
            return
        row = {"step": step, "eval_loss": result["loss"], "eval_perplexity": result["perplexity"],
               "eval_tokens": result["tokens"]}
        if self.main:
            self._append(row)
            msg = f"eval at step {step}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}"
            (self.bar.console.print if self.bar is not None else print)(msg)

    def _append(self, row: dict[str, Any]) -> None:
        self.metrics.append(row)
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self, config_path: Path) -> None:
        """Stop the bar, draw the loss plot, print the summary and the next commands."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.stop()
        plot = plot_losses(self.metrics, self.run_dir / "loss.png")
        train_rows = [m for m in self.metrics if "loss" in m]
        eval_rows = [m for m in self.metrics if "eval_loss" in m]
        last = train_rows[-1] if train_rows else {}
        lines = [
            f"done: {last.get('step', 0)} steps, {last.get('tokens', 0):,} tokens in {last.get('elapsed', 0):.1f} s "
            f"({last.get('tokens_per_s', 0):.0f} tokens/s), peak memory {peak_memory_gib(self.accelerator.device):.2f} GiB",
            f"final train loss {last.get('loss', float('nan')):.4f}"
            + (f", eval loss {eval_rows[-1]['eval_loss']:.4f}" if eval_rows else ""),
            f"adapter: {self.run_dir / 'adapter'}" + (f"   loss plot: {plot}" if plot else ""),
            f"next: lorafit eval {self.run_dir}   |   lorafit merge {self.run_dir} --out {self.run_dir}-merged",
        ]
        for line in lines:
            print(line, file=sys.stdout, flush=True)


def plot_losses(metrics: list[dict[str, Any]], path: Path) -> Path | None:
    """Train (and eval) loss against step as a PNG. Returns the path, or None with nothing to plot."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
