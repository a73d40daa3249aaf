"""Preference data: `preference` (prompt / chosen / rejected) and `unpaired` (prompt / completion / label) rows →
token ids → micro-batches of sequences for the per-sequence log-prob pass.

Every item holds two sequences, prompt + completion each, so one collation serves every objective:
- a pair: (prompt + chosen, prompt + rejected);
- a kto row: (prompt + completion, prompt + the completion of another row of its group): the mismatched pair
  whose log-ratio estimates kto's KL term. Groups are `kl_group` consecutive rows in data order (TRL's way: the
  completions rotated by one within each group), fixed when the data is built, so a precomputed reference matches.

A micro-batch of P items is 2P sequences, [first_0..first_{P-1}, second_0..second_{P-1}], padded on the right as
`collate` pads SFT rows (position ids, no attention mask); labels are -100 on the prompt and padding, and the
completion's EOS / end-of-turn token is trained. Data rows are tokenized in memory (preference sets are small next
to SFT corpora); the rows' token ids key the precomputed reference (`lorafit.preference`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorafit.data.formats import IGNORE_INDEX, _encode, _eos, _render, chat_tokens
from lorafit.data.sources import _check_messages, _raw_rows
from lorafit.errors import DataError

if TYPE_CHECKING:
    import torch

    from lorafit.config import DataConfig, DataSource

PREFERENCE_FORMATS = ("preference", "unpaired")
PREFERENCE_COLUMNS = {"preference": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label")}


@dataclass(frozen=True)
class Seq:
    """One tokenized prompt + completion: `labels` -100 on the prompt; `prompt` = the prompt's token count."""

    input_ids: list[int]
    labels: list[int]
    prompt: int

    def with_completion_of(self, other: Seq, max_length: int) -> Seq:
        ids = self.input_ids[: self.prompt] + other.input_ids[other.prompt:]
        labels = [IGNORE_INDEX] * self.prompt + other.labels[other.prompt:]
        return Seq(ids[:max_length], labels[:max_length], self.prompt)


@dataclass(frozen=True)
class PrefItem:
    """A pair (chosen, rejected) or a kto row (completion, mismatched completion) and where it came from."""

    first: Seq
    second: Seq
    desirable: bool | None = None  # kto rows only
    source: int = 0
    row: int = 0


@dataclass
class PrefAudit:
    """What `lorafit data` and the run's header show about the preference rows."""

    rows: int = 0
    items: int = 0
    eval_items: int = 0
    dropped_prompt: int = 0  # the prompt alone fills data.max_length
    truncated: int = 0  # a completion cut at data.max_length
    dropped_identical: int = 0  # chosen and rejected the same tokens after truncation
    tokens: int = 0
    desirable: int = 0  # kto
    undesirable: int = 0
    max_length: int = 0
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kind = (f"{self.desirable:,} desirable / {self.undesirable:,} undesirable rows" if self.desirable or
                self.undesirable else f"{self.items:,} pairs")
        return (f"{kind} ({self.items:,} train / {self.eval_items:,} eval), {self.tokens:,} tokens, "
                f"{self.truncated:,} truncated, {self.dropped_prompt + self.dropped_identical:,} dropped")


# ------------------------------------------------------------------------------------------------ rows


def _text_or_messages(value: Any, where: str, name: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(value, f"{where}: {name}")
    shown = "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
    raise DataError(f"{where}: column {name!r} must be a string or a list of {{role, content}} messages (got {shown})")


def _common_text_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    cut = a[:n]
    if n < min(len(a), len(b)):  # diverged inside the answers: the word being written belongs to the answers
        cut = cut[: max(cut.rfind(" "), cut.rfind("\n")) + 1]
    return cut


def _split_common(chosen, rejected, where: str):
    """HH's shape: (prompt, chosen answer, rejected answer) from two whole texts or conversations."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}: chosen and rejected must both be texts or both message lists")
    if isinstance(chosen, str):
        prompt = _common_text_prefix(chosen, rejected)
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n]
    if not prompt:
        raise DataError(f"{where}: no prompt column, and chosen and rejected have no common beginning to take as the "
                        "prompt; add a prompt column (or map one with columns: {prompt: ...})")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _check_answer(prompt, answer, where: str, name: str):
    if isinstance(answer, list):
        if not isinstance(prompt, list):
            raise DataError(f"{where}: {name} is a message list, so the prompt must be one too (the turns before it)")
        bad = [i for i, m in enumerate(answer) if m["role"] != "assistant"]
        if bad:
            raise DataError(f"{where}: {name}[{bad[0]}] has role {answer[bad[0]]['role']!r}; the answer's turns must be "
                            "the assistant's")
        empty = not answer or all(not m["content"].strip() and not m.get("tool_calls") for m in answer)
    else:
        if isinstance(prompt, list):
            answer = [{"role": "assistant", "content": answer}]
        empty = not (answer if isinstance(answer, str) else answer[0]["content"]).strip()
    if empty:
        raise DataError(f"{where}: {name} is empty; every answer needs at least one token to score")
    return answer


def check_preference_row(item: Any, fmt: str, columns: dict[str, str], where: str) -> dict[str, Any]:
    """A raw `preference` or `unpaired` row as {prompt, chosen, rejected} / {prompt, completion, label}.

    Raises:
        DataError: a missing column, wrong types, roles that do not fit, an empty or identical answer, a kto label
            that is not a boolean, or (HH's shape) no common beginning of chosen and rejected.
    """
    if not isinstance(item, dict):
        raise DataError(f"{where}: a row must be an object with named columns (got {type(item).__name__})")
    name = {c: columns.get(c, c) for c in PREFERENCE_COLUMNS[fmt]}
    needed = [c for c in PREFERENCE_COLUMNS[fmt] if not (fmt == "preference" and c == "prompt")]
    missing = [c + (f" (as {name[c]!r})" if name[c] != c else "") for c in needed if name[c] not in item]
    if fmt == "unpaired" and name["prompt"] not in item:
        missing.insert(0, "prompt")
    if missing:
        raise DataError(f"{where}: format {fmt} needs column(s) {', '.join(missing)}; found: "
                        f"{', '.join(map(str, item)) or 'none'}")
    if fmt == "unpaired":
        label = item[name["label"]]
        if not isinstance(label, bool):
            raise DataError(f"{where}: column {name['label']!r} must be true (desirable) or false (undesirable), "
                            f"got {label!r:.40}")
        prompt = _text_or_messages(item[name["prompt"]], where, name["prompt"])
        completion = _check_answer(prompt, _text_or_messages(item[name["completion"]], where, name["completion"]),
                                   where, name["completion"])
        return {"prompt": prompt, "completion": completion, "label": label}
    chosen = _text_or_messages(item[name["chosen"]], where, name["chosen"])
    rejected = _text_or_messages(item[name["rejected"]], where, name["rejected"])
    if item.get(name["prompt"]) is None:
        prompt, chosen, rejected = _split_common(chosen, rejected, where)
    else:
        prompt = _text_or_messages(item[name["prompt"]], where, name["prompt"])
    chosen = _check_answer(prompt, chosen, where, name["chosen"])
    rejected = _check_answer(prompt, rejected, where, name["rejected"])
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical; a pair needs two different answers")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_preference_source(source: DataSource) -> list[tuple[str, dict[str, Any]]]:
    """All rows of a `preference` / `unpaired` source, checked. Raises DataError on the first bad row."""
    rows = [(w, check_preference_row(item, source.format, source.columns, w)) for w, item in _raw_rows(source)]
    if not rows:
        raise DataError(f"{source.path}: no rows (the data set is empty)")
    return rows


# ------------------------------------------------------------------------------------------------ tokens


def sequence_tokens(tokenizer, prompt, answer, template: str | None) -> Seq:
    """Prompt + answer as a `Seq`: strings with the tokenizer's BOS and an EOS after the answer; message lists
    rendered with the chat template, the answer's turns (with their end-of-turn tokens) trained."""
    if isinstance(prompt, str):
        p = _encode(tokenizer, prompt, special=True)
        ids = p + _encode(tokenizer, answer, special=False) + [_eos(tokenizer)]
        return Seq(ids, [IGNORE_INDEX] * len(p) + ids[len(p):], len(p))
    ids, labels = chat_tokens(tokenizer, prompt + answer, template, train_on_prompt=False)
    before = _render(tokenizer, prompt, template, generation_prompt=True) if prompt else []
    n = 0
    while n < min(len(ids), len(before)) and ids[n] == before[n]:
        n += 1
    return Seq(ids, [IGNORE_INDEX] * n + labels[n:], n)


def _fit(seq: Seq, max_length: int) -> tuple[Seq | None, bool]:
    """(the sequence cut to max_length, whether it was cut); None when the prompt alone fills max_length."""
    if seq.prompt >= max_length:
        return None, False
    if len(seq.input_ids) <= max_length:
        return seq, False
    return Seq(seq.input_ids[:max_length], seq.labels[:max_length], seq.prompt), True


def _items_of_row(tokenizer, row: dict[str, Any], data_cfg: DataConfig, kto: bool):
    """(first, second, desirable) tuples of one checked row (a pair becomes two kto rows under kto)."""
    t = data_cfg.chat_template
    if "completion" in row:
        return [(sequence_tokens(tokenizer, row["prompt"], row["completion"], t), None, row["label"])]
    chosen = sequence_tokens(tokenizer, row["prompt"], row["chosen"], t)
    rejected = sequence_tokens(tokenizer, row["prompt"], row["rejected"], t)
    return [(chosen, None, True), (rejected, None, False)] if kto else [(chosen, rejected, None)]


def tokenize_preference(sources: list[DataSource], tokenizer, data_cfg: DataConfig, kto: bool,
                        audit: PrefAudit) -> tuple[list[PrefItem], list[int]]:
    """Items of all `sources` (kto's mismatched partners not yet set), and per source its row count."""
    items, rows_per_source = [], []
    for si, source in enumerate(sources):
        rows = read_preference_source(source)
        rows_per_source.append(len(rows))
        for ri, (_, row) in enumerate(rows):
            for first, second, desirable in _items_of_row(tokenizer, row, data_cfg, kto):
                first, cut1 = _fit(first, data_cfg.max_length)
                second, cut2 = _fit(second, data_cfg.max_length) if second is not None else (first, False)
                if first is None or second is None:
                    audit.dropped_prompt += 1
                    continue
                if not kto and first.input_ids == second.input_ids:  # different texts, the same tokens once cut
                    audit.dropped_identical += 1
                    continue
                audit.truncated += cut1 or cut2
                items.append(PrefItem(first, second, desirable, si, ri))
    return items, rows_per_source


def with_kl_partners(items: list[PrefItem], group: int, max_length: int) -> list[PrefItem]:
    """kto: each row's second sequence = its prompt + the completion of the row before it in its group of `group`."""
    out = []
    for start in range(0, len(items), group):
        part = items[start: start + group]
        for i, item in enumerate(part):
            other = part[i - 1] if len(part) > 1 else item
            out.append(PrefItem(item.first, item.first.with_completion_of(other.first, max_length), item.desirable,
                                item.source, item.row))
    return out


def build_preference_datasets(data_cfg: DataConfig, tokenizer, *, seed: int, kto: bool,
                              kl_group: int = 2) -> tuple[list[PrefItem], list[PrefItem], PrefAudit]:
    """Train and eval items of a preference run, and their audit.

    Args:
        data_cfg: the data section (sources of format preference / unpaired).
        tokenizer: the model's tokenizer.
        seed: seeds the eval_fraction hold-out.
        kto: rows as kto reads them (pairs split into desirable / undesirable rows, mismatched partners added).
        kl_group: kto: rows per group whose completions are rotated for the KL estimate (the micro-batch size).

    Raises:
        DataError: bad rows (see `check_preference_row`), no usable item, or kto data of one label only.
    """
    from lorafit.data.build import split_eval

    audit = PrefAudit(max_length=data_cfg.max_length)
    train, per_source = tokenize_preference(data_cfg.train, tokenizer, data_cfg, kto, audit)
    audit.rows = sum(per_source)
    if data_cfg.eval:
        eval_items, _ = tokenize_preference(data_cfg.eval, tokenizer, data_cfg, kto, PrefAudit())
    else:
        offsets = [sum(per_source[:i]) for i in range(len(per_source))]
        held = split_eval(audit.rows, data_cfg.eval_fraction, seed)
        eval_items = [it for it in train if offsets[it.source] + it.row in held]
        train = [it for it in train if offsets[it.source] + it.row not in held]
    train = _mix(train, data_cfg.train, seed)
    if not train:
        raise DataError(f"no preference item is left for training ({audit.rows} rows read, {audit.dropped_prompt} "
                        f"dropped because the prompt alone fills data.max_length {data_cfg.max_length}); raise "
                        "data.max_length or check the data with `lorafit data CONFIG`")
    if kto:
        good = sum(1 for it in train if it.desirable)
        if good in (0, len(train)):
            which = "desirable" if good else "undesirable"
            raise DataError(f"the kto training data has only {which} rows ({len(train)}); kto needs both labels "
                            "(label: true and label: false)")
        audit.desirable, audit.undesirable = good, len(train) - good
        train = with_kl_partners(train, kl_group, data_cfg.max_length)
        eval_items = with_kl_partners(eval_items, kl_group, data_cfg.max_length)
    audit.items, audit.eval_items = len(train), len(eval_items)
    audit.tokens = sum(len(it.first.input_ids) + len(it.second.input_ids) for it in train)
    if audit.dropped_prompt:
        audit.warnings.append(f"{audit.dropped_prompt} item(s) dropped: the prompt alone fills data.max_length "
                              f"({data_cfg.max_length})")
    if audit.dropped_identical:
        audit.warnings.append(f"{audit.dropped_identical} pair(s) dropped: chosen and rejected are the same tokens "
                              f"once cut at data.max_length ({data_cfg.max_length})")
    if audit.truncated:
        audit.warnings.append(f"{audit.truncated} item(s) truncated at data.max_length ({data_cfg.max_length}): "
                              "their answers lose their end, and with it the end token")
    return train, eval_items, audit


def _mix(items: list[PrefItem], sources: list[DataSource], seed: int) -> list[PrefItem]:
    from lorafit.data.build import draw, sample_count

    out = []
    for i, s in enumerate(sources):
        mine = [it for it in items if it.source == i]
        n = sample_count(s, len(mine), f"data.train.{i}") if mine else None
        if n is not None:
            mine = [mine[j] for j in draw(len(mine), n, s.replace, seed * 1_000_003 + i)]
        out += mine
    return out


def shuffled(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def items_fingerprint(items: list[PrefItem]) -> str:
    """A hash of every item's token ids (keys the precomputed reference)."""
    h = hashlib.sha256()
    for it in items:
        for s in (it.first, it.second):
            h.update(repr((s.input_ids, s.prompt)).encode())
    return h.hexdigest()[:20]


# ------------------------------------------------------------------------------------------------ batches


def collate_items(items: list[PrefItem], pad_id: int | None, score_prompts: bool = False) -> dict[str, torch.Tensor]:
    """One micro-batch of P items as 2P right-padded sequences [first..., second...].

    Args:
        items: the micro-batch.
        pad_id: the id written in padding (never attended to by real tokens, never scored).
        score_prompts: also score the first sequences' prompt tokens, as sequences 2P..3P-1 of their own (orpo's NLL
            covers the chosen prompt and answer, as TRL's).

    Returns:
        {"input_ids", "labels", "position_ids", "seq_index"} (2P, T) int64, "n_seqs" (the sequences scored: 2P or
        3P), and "desirable" (P,) bool for kto rows.
    """
    import torch

    seqs = [it.first for it in items] + [it.second for it in items]
    width = max(len(s.input_ids) for s in seqs)
    pad = 0 if pad_id is None else pad_id
    ids, labels, positions, owners = [], [], [], []
    for i, s in enumerate(seqs):
        n = width - len(s.input_ids)
        ids.append(s.input_ids + [pad] * n)
        row = list(s.labels)
        owner = [i] * width
        if score_prompts and i < len(items):
            row[: s.prompt] = s.input_ids[: s.prompt]
            owner[: s.prompt] = [2 * len(items) + i] * s.prompt
        labels.append(row + [IGNORE_INDEX] * n)
        owners.append(owner)
        positions.append(list(range(len(s.input_ids))) + list(range(n)))  # padding: a segment of its own
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions),
           "seq_index": torch.tensor(owners), "n_seqs": torch.tensor((3 if score_prompts else 2) * len(items))}
    if items and items[0].desirable is not None:
        out["desirable"] = torch.tensor([bool(it.desirable) for it in items])
    return out


# ------------------------------------------------------------------------------------------------ report


def print_preference_report(cfg, tokenizer, console, n_items: int = 3) -> None:
    """`lorafit data` of a preference run: a few items with the scored tokens of both sequences highlighted, the
    lengths and the audit (dropped, truncated, identical); raises the data's DataError after printing what it can."""
    from rich.panel import Panel

    from lorafit.data.formats import Example
    from lorafit.data.report import PROMPT_STYLE, TRAINED_STYLE, length_histogram, render_example

    kto = cfg.train.objective == "kto"
    train, _, audit = build_preference_datasets(cfg.data, tokenizer, seed=cfg.train.seed, kto=kto,
                                                kl_group=cfg.train.batch_size)
    names = ("completion", "mismatched (KL)") if kto else ("chosen", "rejected")
    for it in train[:n_items]:
        label = "" if it.desirable is None else (" desirable" if it.desirable else " undesirable")
        for name, s in zip(names, (it.first, it.second), strict=True):
            scored = sum(x != IGNORE_INDEX for x in s.labels[1:])
            title = (f"{cfg.data.train[it.source].path} row {it.row + 1}{label}, {name}: {len(s.input_ids)} tokens, "
                     f"{scored} scored")
            console.print(Panel(render_example(tokenizer, Example(s.input_ids, s.labels)), title=title,
                                title_align="left"))
    console.print(f"[{TRAINED_STYLE}]scored[/] [{PROMPT_STYLE}]prompt (not scored)[/]")
    console.print("token lengths (sequences):")
    lengths = [len(s.input_ids) for it in train for s in (it.first, it.second)]
    for line in length_histogram(lengths, cfg.data.max_length):
        console.print(line, highlight=False)
    console.print(f"data: {audit.rows:,} rows read; {audit}", highlight=False)
    for w in audit.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print("[green]data ok[/]")
