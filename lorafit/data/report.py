"""What `lorafit data CONFIG` prints: examples with trained tokens highlighted, lengths, packing, the audit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.data.build import DataAudit, check_audit, make_audit, prepare_examples
from lorafit.data.formats import IGNORE_INDEX, Example
from lorafit.data.packing import make_rows

if TYPE_CHECKING:
    from lorafit.config import Config

TRAINED_STYLE = "bold black on green"
PROMPT_STYLE = "dim"


def render_example(tokenizer, example: Example):
    """The example's text as a rich `Text`: trained tokens highlighted, the rest dimmed.

    Consecutive tokens with the same status are decoded together, so multi-byte characters split across byte-level
    tokens still read correctly.
    """
    from rich.text import Text

    text = Text()
    trained = [lab != IGNORE_INDEX for lab in example.labels]
    start = 0
    for i in range(1, len(trained) + 1):
        if i == len(trained) or trained[i] != trained[start]:
            piece = tokenizer.decode(example.input_ids[start:i], skip_special_tokens=False)
            text.append(piece, style=TRAINED_STYLE if trained[start] else PROMPT_STYLE)
            start = i
    return text


def length_histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    """Text bars of the token-length distribution, one line per bin of equal width up to `max_length`."""
    if not lengths:
        return []
    size = max(1, math.ceil(max_length / bins))
    counts = [0] * math.ceil(max_length / size)
    for n in lengths:
        counts[min((n - 1) // size, len(counts) - 1)] += 1
    top = max(counts)
    lines = []
    for b, c in enumerate(counts):
        bar = "█" * math.ceil(width * c / top) if c else ""
        lines.append(f"{b * size + 1:>6}–{min((b + 1) * size, max_length):<6} {bar} {c}")
    return lines


def _audit_table(audit: DataAudit):
    from rich.table import Table

    table = Table(title="label audit", show_header=False, title_justify="left")
    dropped = audit.dropped_truncated + audit.dropped_unsupervised
    table.add_row("rows read", f"{audit.rows:,}")
    table.add_row("examples", f"{audit.examples:,} train, {audit.eval_examples:,} eval")
    table.add_row("tokens", f"{audit.tokens:,}, of which {audit.supervised:,} trained "
                  f"({audit.supervised_fraction:.1%})")
    table.add_row("truncated", f"{audit.truncated:,} (dropped {dropped:,}: {audit.dropped_truncated:,} cut, "
                  f"{audit.dropped_unsupervised:,} nothing to train)")
    if audit.end_checked:
        table.add_row("end token trained", f"{audit.end_trained:,} of {audit.end_checked:,} examples")
    table.add_row("rows", f"{audit.packed_rows:,} of ≤ {audit.max_length:,} tokens, "
                  f"{audit.packing_efficiency:.1%} of slots hold real tokens")
    return table


def _mixture_table(audit: DataAudit):
    from rich.table import Table

    table = Table(title="mixture (train)", title_justify="left")
    for name in ("source", "examples", "drawn", "tokens", "share"):
        table.add_column(name, justify="left" if name == "source" else "right")
    for m in audit.mixture:
        table.add_row(m.path, f"{m.available:,}", f"{m.drawn:,}", f"{m.tokens:,}", f"{m.share:.1%}")
    return table


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_data_report(cfg: Config, tokenizer, console, n_examples: int = 3, cache_dir: Path | None = None) -> None:
    """What `lorafit data CONFIG` shows: examples with trained tokens highlighted, lengths, packing, the audit.

    Args:
        cfg: the resolved config.
        tokenizer: the model's tokenizer.
        console: a rich Console to print on.
        n_examples: how many training examples to render.
        cache_dir: the tokenized-data cache; default `$LORAFIT_CACHE` or ~/.cache/lorafit.

    Raises:
        DataError: as `build_datasets`, after printing, so a refused data set can still be inspected.
    """
    from rich.panel import Panel

    if cfg.train.objective != "sft":  # pairs / labelled rows: their own rendering and audit
        from lorafit.data.preference import print_preference_report

        return print_preference_report(cfg, tokenizer, console, n_examples)
    d = cfg.data
    prepared = prepare_examples(d, tokenizer, seed=cfg.train.seed, cache_dir=cache_dir)
    rows = make_rows(prepared.train, d.max_length, d.packing)
    audit = make_audit(prepared, rows, d.max_length)
    for e in prepared.train[:n_examples]:
        n_trained = sum(lab != IGNORE_INDEX for lab in e.labels)
        title = f"{d.train[e.source].path} row {e.row + 1}: {len(e.input_ids)} tokens, {n_trained} trained"
        console.print(Panel(render_example(tokenizer, e), title=title, title_align="left"))
    console.print(f"[{TRAINED_STYLE}]trained[/] [{PROMPT_STYLE}]not trained[/]")
    console.print("token lengths (examples):")
    for line in length_histogram([len(e.input_ids) for e in prepared.train], d.max_length):
        console.print(line, highlight=False)
    console.print(_audit_table(audit))
    console.print(_mixture_table(audit))
    console.print(f"token store: {_size(audit.store_bytes)} on disk; data read in {audit.seconds:.1f} s", highlight=False)
    for w in audit.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    check_audit(audit, d.max_length)
    console.print("[green]data ok[/]")
