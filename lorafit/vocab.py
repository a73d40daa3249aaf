"""The vocabulary a run trains: added tokens, untrained special tokens, whole modules (`model.add_tokens`,
`adapter.train_tokens`, `adapter.modules_to_save`).

Before training, the special tokens the rendered data uses are checked against the base: a row (of the embedding,
or of an untied head) whose norm is below `adapters.tokens.UNTRAINED_RATIO` × the median row norm is untrained.
With `train_tokens: auto` those rows and the added tokens' rows start at the mean row and train as token rows
(`adapters.tokens.TokenRows`, saved as PEFT's trainable_token_indices); `none` refuses untrained ones; a list
trains exactly those tokens.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from lorafit.config import Config
from lorafit.errors import ConfigError, LorafitError

SCANNED_ROWS = 5000  # training rows scanned for the special tokens the data uses (beside the format's own)


@dataclass
class TokenPlan:
    """Which token rows a run trains, and why (for the run header)."""

    ids: list[int] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    untrained: list[str] = field(default_factory=list)  # used by the data, untrained in the base
    listed: list[str] = field(default_factory=list)  # train_tokens: [..]

    def header(self) -> str | None:
        parts = [f"added {', '.join(self.added)}"] if self.added else []
        if self.untrained:
            parts.append(f"untrained in the base {', '.join(self.untrained)} (start at the mean row)")
        if self.listed:
            parts.append(f"listed {', '.join(self.listed)}")
        return f"token rows trained: {'; '.join(parts)}" if parts else None


def special_ids_used(tokenizer, rows, limit: int = SCANNED_ROWS) -> set[int]:
    """The special token ids in the first `limit` training rows."""
    special = set(tokenizer.all_special_ids)
    used: set[int] = set()
    for i in range(min(len(rows), limit)):
        used |= special.intersection(rows[i].input_ids)
    return used


def _untrained(model, ids: list[int]) -> list[int]:
    from lorafit.adapters.tokens import heads_tied, untrained_rows

    found = set(untrained_rows(model.get_input_embeddings().weight, ids))
    head = model.get_output_embeddings()
    if head is not None and not heads_tied(model):
        found |= set(untrained_rows(head.weight, ids))
    return sorted(found)


def _listed_ids(tokenizer, tokens: list[str]) -> list[int]:
    vocab = tokenizer.get_vocab()
    problems = []
    for t in tokens:
        if t not in vocab:
            close = difflib.get_close_matches(t, list(tokenizer.all_special_tokens) + list(vocab), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"adapter.train_tokens: {t} is not a token of the tokenizer{hint}")
    if problems:
        raise ConfigError(problems)
    return [vocab[t] for t in tokens]


def plan_token_rows(cfg: Config, model, tokenizer, rows, end_ids: set[int]) -> TokenPlan:
    """The token rows this run trains (see the module docstring).

    Raises:
        LorafitError: train_tokens none with untrained special tokens in the data (listed, with the fix), or a
            listed token the tokenizer lacks.
    """
    a, plan = cfg.adapter, TokenPlan()
    if isinstance(a.train_tokens, list):
        plan.ids, plan.listed = _listed_ids(tokenizer, a.train_tokens), list(a.train_tokens)
        return plan
    added = tokenizer.convert_tokens_to_ids(list(cfg.model.add_tokens)) if cfg.model.add_tokens else []
    used = sorted((special_ids_used(tokenizer, rows) | set(end_ids)) - set(added))
    untrained = _untrained(model, used)
    names = tokenizer.convert_ids_to_tokens(untrained)
    if a.train_tokens == "none" and untrained:
        raise LorafitError(f"adapter.train_tokens: none, and the data uses special tokens whose rows are untrained in "
                           f"{cfg.model.path}: {', '.join(names)} (row norm below 1% of the median): trained this way "
                           f"the model cannot learn them (NaNs, answers that never stop); set adapter.train_tokens: "
                           f"auto to train their rows (saved in the adapter), or change the chat template")
    plan.ids, plan.added, plan.untrained = sorted({*added, *untrained}), list(cfg.model.add_tokens), names
    return plan


def attach_vocab_trainables(cfg: Config, model, plan: TokenPlan) -> list[str]:
    """modules_to_save and token rows on the model, after the adapter: untrained rows start at the mean row, a
    continued adapter's own rows keep their values, a module trained whole needs no token rows.

    Returns:
        The modules_to_save module names.
    """
    from lorafit.adapters.tokens import TokenRows, attach_token_rows, init_rows, train_whole, unwrap_token_rows

    whole = train_whole(model, cfg.adapter.modules_to_save) if cfg.adapter.modules_to_save else []
    embed = model.get_input_embeddings()
    keep = embed.token_indices if isinstance(embed, TokenRows) else []  # a continued adapter's own rows
    unwrap_token_rows(model, merge=True)
    init_rows(model, [i for i in _untrained(model, plan.ids) if i not in keep])
    ids = sorted({*plan.ids, *keep})
    trained_whole = {id(m) for n, m in model.named_modules() if n in whole}
    if ids:
        attach_token_rows(model, ids, embed=id(model.get_input_embeddings()) not in trained_whole,
                          head=id(model.get_output_embeddings()) not in trained_whole)
    return whole


def run_tokenizer(cfg: Config):
    """The tokenizer a run trains with: the base's, or with adapter.from the one saved beside that adapter (its
    added tokens included); model.add_tokens added on top."""
    from pathlib import Path

    from lorafit.model import add_tokens, load_tokenizer

    if cfg.adapter.from_ is not None:
        from lorafit.adapters.peft_io import adapter_dir_of

        parent = adapter_dir_of(cfg.adapter.from_)
        if (Path(parent) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(cfg.model.model_copy(update={"path": str(parent), "add_tokens": []}))
            add_tokens(tokenizer, cfg.model.add_tokens)
            return tokenizer
    return load_tokenizer(cfg.model)
