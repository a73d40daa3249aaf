"""Rows → token ids and labels for each format (alpaca, completion, chat, text), masks built from spans."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafit.data.sources import REQUIRED_COLUMNS
from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.config import DataConfig

IGNORE_INDEX = -100

# The Stanford Alpaca prompts; rows without (or with an empty) input use the shorter one.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One tokenized row. `labels` has -100 where no loss is taken; `source`/`row` say where it came from."""

    input_ids: list[int]
    labels: list[int]
    source: int = 0  # index into the list of sources it was read from
    row: int = 0  # 0-based row within that source


@dataclass
class SourceStats:
    """What happened to one source's rows on the way to examples."""

    rows: int = 0  # rows read
    truncated: int = 0  # rows longer than max_length (kept or dropped)
    dropped_truncated: int = 0  # rows whose trained tokens all lay past max_length
    dropped_unsupervised: int = 0  # rows with nothing to train (e.g. a chat without an assistant turn)


def labels_from_spans(input_ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Labels that train exactly the tokens inside `spans` ([start, end) index pairs).

    `labels[0]` is always -100: nothing predicts the first token, and in a packed row this keeps the previous
    example's last token from being trained to predict it.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def truncate(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut on the right to `max_length` tokens. Returns (input_ids, labels, whether anything was cut)."""
    return input_ids[:max_length], labels[:max_length], len(input_ids) > max_length


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token, so the model could not learn to stop; use a tokenizer "
                        "that defines eos_token")
    return tokenizer.eos_token_id


def alpaca_prompt(instruction: str, input_text: str, template: str | None = None) -> str:
    """The Alpaca prompt for one row. A custom `template` gets `{input}` replaced by "" when the row has no input."""
    if template is None:
        template = ALPACA_PROMPT if input_text.strip() else ALPACA_PROMPT_NO_INPUT
    # str.replace, not str.format: user templates may hold other braces (JSON examples, code).
    return template.replace("{instruction}", instruction).replace("{input}", input_text)


def prompt_response_tokens(tokenizer, prompt: str, response: str, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Tokens and labels of prompt + response + EOS; the response and its EOS are always trained.

    The two parts are tokenized separately (prompt with the tokenizer's BOS) so the prompt's tokens are exactly
    those the model sees at inference.
    """
    prompt_ids = _encode(tokenizer, prompt, special=True)
    ids = prompt_ids + _encode(tokenizer, response, special=False) + [_eos(tokenizer)]
    start = 0 if train_on_prompt else len(prompt_ids)
    return ids, labels_from_spans(ids, [(start, len(ids))])


def text_tokens(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Tokens and labels of a plain text + EOS: every token trained."""
    ids = _encode(tokenizer, text, special=True) + [_eos(tokenizer)]
    return ids, labels_from_spans(ids, [(0, len(ids))])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _render(tokenizer, messages: list[dict[str, str]], template: str | None, generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)
    # Chat templates write their own special tokens (BOS included), so the tokenizer must not add any.
    return _encode(tokenizer, text, special=False)


def chat_tokens(tokenizer, messages: list[dict[str, str]], template: str | None,
                train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Tokens and labels of a conversation: assistant turns trained, each with its end-of-turn token(s).

    Assistant spans are found by rendering prefixes of the conversation and diffing token ids: turn i starts where
    `messages[:i]` + generation prompt ends and stops where `messages[:i+1]` ends, so whatever the template writes
    after the content (`<|im_end|>`, `<|eot_id|>`, `</s>`) is inside the span. This needs no `{% generation %}`
    support. Templates that rewrite earlier turns (e.g. dropping old reasoning) are handled by taking the common
    prefix with the full rendering.
    """
    ids = _render(tokenizer, messages, template, generation_prompt=False)
    if train_on_prompt:
        return ids, labels_from_spans(ids, [(0, len(ids))])
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(ids, _render(tokenizer, messages[:i], template, generation_prompt=True))
        end = _common_prefix(ids, _render(tokenizer, messages[: i + 1], template, generation_prompt=False))
        if end > start:
            spans.append((start, end))
    return ids, labels_from_spans(ids, spans)


def end_token_ids(tokenizer, template: str | None = None, chat: bool = False) -> set[int]:
    """Ids whose training teaches the model to stop: EOS, plus for chat the special tokens closing an assistant turn."""
    ids = {tokenizer.eos_token_id} - {None}
    if chat:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            tokens, labels = chat_tokens(tokenizer, probe, template, train_on_prompt=False)
        except Exception:  # noqa: BLE001 - a template that rejects the probe: fall back to EOS
            return ids
        special = set(tokenizer.all_special_ids)
        ids |= {t for t, lab in zip(tokens, labels, strict=True) if lab != IGNORE_INDEX and t in special}
    return ids


def example_tokens(tokenizer, row: dict[str, Any], fmt: str, data_cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Tokens and labels (not yet truncated) of one checked row in format `fmt`."""
    if fmt == "alpaca":
        prompt = alpaca_prompt(row["instruction"], row["input"], data_cfg.prompt_template)
        return prompt_response_tokens(tokenizer, prompt, row["output"], data_cfg.train_on_prompt)
    if fmt == "completion":
        return prompt_response_tokens(tokenizer, row["prompt"], row["completion"], data_cfg.train_on_prompt)
    if fmt == "chat":
        return chat_tokens(tokenizer, row["messages"], data_cfg.chat_template, data_cfg.train_on_prompt)
    if fmt == "text":
        return text_tokens(tokenizer, row["text"])
    raise DataError(f"unknown format {fmt!r}; use one of {', '.join(REQUIRED_COLUMNS)}")


def _check_templates(tokenizer, fmt: str, data_cfg: DataConfig) -> None:
    if fmt == "alpaca" and data_cfg.prompt_template is not None and "{instruction}" not in data_cfg.prompt_template:
        raise DataError("data.prompt_template: must contain {instruction} (and usually {input}); "
                        f"got {data_cfg.prompt_template!r}")
    if fmt == "chat" and data_cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("format chat: the tokenizer has no chat template; set data.chat_template "
                        "(a Jinja template over `messages`)")


def tokenize_rows(rows: list[tuple[str, dict[str, Any]]], tokenizer, fmt: str, data_cfg: DataConfig,
                  source: int = 0, progress=None) -> tuple[list[Example], SourceStats]:
    """Checked rows of one source → truncated examples, dropping rows left with nothing to train.

    Args:
        rows: (where, row) pairs from `read_source`.
        tokenizer: a Hugging Face tokenizer.
        fmt: the source's format.
        data_cfg: for max_length, train_on_prompt and the templates.
        source: index stored in each example.
        progress: an optional callable advanced by one per row.

    Returns:
        The examples and the counts of rows read, truncated and dropped.
    """
    _check_templates(tokenizer, fmt, data_cfg)
    stats = SourceStats(rows=len(rows))
    examples = []
    for i, (where, row) in enumerate(rows):
        try:
            ids, labels = example_tokens(tokenizer, row, fmt, data_cfg)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - chat templates raise their own errors ("roles must alternate")
            raise DataError(f"{where}: cannot render this row as {fmt}: {e}") from None
        trained_before = any(lab != IGNORE_INDEX for lab in labels)
        ids, labels, cut = truncate(ids, labels, data_cfg.max_length)
        stats.truncated += cut
        if not any(lab != IGNORE_INDEX for lab in labels):
            stats.dropped_truncated += trained_before
            stats.dropped_unsupervised += not trained_before
        else:
            examples.append(Example(ids, labels, source, i))
        if progress is not None:
            progress()
    return examples, stats
