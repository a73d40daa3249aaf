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


def _render_text(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool,
                 tools: list[dict] | None = None) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def _render(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool,
            tools: list[dict] | None = None) -> list[int]:
    text = _render_text(tokenizer, messages, template, generation_prompt, tools)
    # Chat templates write their own special tokens (BOS included), so the tokenizer must not add any.
    return _encode(tokenizer, text, special=False) if text else []


def chat_texts(tokenizer, messages: list[dict], template: str | None, train_on_prompt: bool,
               tools: list[dict] | None = None) -> list[str]:
    """What `chat_tokens` tokenizes: the whole conversation, then per assistant turn i the renderings of
    `messages[:i]` + generation prompt and of `messages[:i+1]` (none with `train_on_prompt`)."""
    texts = [_render_text(tokenizer, messages, template, False, tools)]
    if not train_on_prompt:
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                texts += [_render_text(tokenizer, messages[:i], template, True, tools),
                          _render_text(tokenizer, messages[: i + 1], template, False, tools)]
    return texts


def chat_labels(encoded: list[list[int]], train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Tokens and labels of a conversation from the encoded `chat_texts` (see `chat_tokens`)."""
    ids = encoded[0]
    if train_on_prompt:
        return ids, labels_from_spans(ids, [(0, len(ids))])
    spans = []
    for before, through in zip(encoded[1::2], encoded[2::2], strict=True):
        start, end = _common_prefix(ids, before), _common_prefix(ids, through)
        if end > start:
            spans.append((start, end))
    return ids, labels_from_spans(ids, spans)


def chat_tokens(tokenizer, messages: list[dict[str, str]], template: str | None,
                train_on_prompt: bool, tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Tokens and labels of a conversation: assistant turns trained, each with its end-of-turn token(s).

    Assistant spans are found by rendering prefixes of the conversation and diffing token ids: turn i starts where
    `messages[:i]` + generation prompt ends and stops where `messages[:i+1]` ends, so whatever the template writes
    after the content (`<|im_end|>`, `<|eot_id|>`, `</s>`) is inside the span. This needs no `{% generation %}`
    support. Templates that rewrite earlier turns (e.g. dropping old reasoning) are handled by taking the common
    prefix with the full rendering.
    """
    texts = chat_texts(tokenizer, messages, template, train_on_prompt, tools)
    return chat_labels([_encode(tokenizer, t, special=False) if t else [] for t in texts], train_on_prompt)


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
        return chat_tokens(tokenizer, row["messages"], data_cfg.chat_template, data_cfg.train_on_prompt,
                           row.get("tools"))
    if fmt == "text":
        return text_tokens(tokenizer, row["text"])
    raise DataError(f"unknown format {fmt!r}; use one of {', '.join(REQUIRED_COLUMNS)}")


def _encode_many(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts in one call: the fast tokenizer encodes a batch on all cores.

    A fast tokenizer's Rust backend is called directly, without computing the character offsets transformers asks
    for (a third of the time); its ids are the same.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _chat_batch(tokenizer, rows: list[tuple[str, dict[str, Any]]], data_cfg: DataConfig):
    texts, counts = [], []
    for where, row in rows:
        try:
            mine = chat_texts(tokenizer, row["messages"], data_cfg.chat_template, data_cfg.train_on_prompt,
                              row.get("tools"))
        except Exception as e:  # noqa: BLE001 - chat templates raise their own errors ("roles must alternate")
            raise DataError(f"{where}: cannot render this row as chat: {e}") from None
        texts += mine
        counts.append(len(mine))
    encoded, out, start = _encode_many(tokenizer, texts, special=False), [], 0
    for n in counts:
        out.append(chat_labels(encoded[start: start + n], data_cfg.train_on_prompt))
        start += n
    return out


def batch_example_tokens(tokenizer, rows: list[tuple[str, dict[str, Any]]], fmt: str,
                         data_cfg: DataConfig) -> list[tuple[list[int], list[int]]]:
    """`example_tokens` of many checked rows with one tokenizer call per part (prompts, responses, texts).

    Gives exactly the ids of `example_tokens` row by row; a row that cannot be rendered is named by its `where`.
    """
    if fmt == "chat":
        return _chat_batch(tokenizer, rows, data_cfg)
    eos = _eos(tokenizer)
    if fmt == "text":
        return [(ids + [eos], labels_from_spans(ids + [eos], [(0, len(ids) + 1)]))
                for ids in _encode_many(tokenizer, [r["text"] for _, r in rows], special=True)]
    if fmt == "alpaca":
        prompts = [alpaca_prompt(r["instruction"], r["input"], data_cfg.prompt_template) for _, r in rows]
        responses = [r["output"] for _, r in rows]
    elif fmt == "completion":
        prompts, responses = [r["prompt"] for _, r in rows], [r["completion"] for _, r in rows]
    else:
        raise DataError(f"unknown format {fmt!r}; use one of {', '.join(REQUIRED_COLUMNS)}")
    out = []
    for p, r in zip(_encode_many(tokenizer, prompts, True), _encode_many(tokenizer, responses, False), strict=True):
        ids = p + r + [eos]
        out.append((ids, labels_from_spans(ids, [(0 if data_cfg.train_on_prompt else len(p), len(ids))])))
    return out


def check_templates(tokenizer, fmt: str, data_cfg: DataConfig) -> None:
    """Refuse a custom Alpaca template without {instruction}, or chat without any chat template."""
    if fmt == "alpaca" and data_cfg.prompt_template is not None and "{instruction}" not in data_cfg.prompt_template:
        raise DataError("data.prompt_template: must contain {instruction} (and usually {input}); "
                        f"got {data_cfg.prompt_template!r}")
    if fmt == "chat" and data_cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("format chat: the tokenizer has no chat template; set data.chat_template "
                        "(a Jinja template over `messages`)")


def tokenize_rows(rows: list[tuple[str, dict[str, Any]]], tokenizer, fmt: str, data_cfg: DataConfig,
                  source: int = 0, progress=None, first_row: int = 0) -> tuple[list[Example], SourceStats]:
    """Checked rows of one source → truncated examples, dropping rows left with nothing to train.

    Args:
        rows: (where, row) pairs from `read_source` (all of a source, or a run of its rows).
        tokenizer: a Hugging Face tokenizer.
        fmt: the source's format.
        data_cfg: for max_length, train_on_prompt and the templates.
        source: index stored in each example.
        progress: an optional callable, given the number of rows done.
        first_row: the source row number of `rows[0]` (stored in the examples).

    Returns:
        The examples and the counts of rows read, truncated and dropped.
    """
    check_templates(tokenizer, fmt, data_cfg)
    stats = SourceStats(rows=len(rows))
    examples = []
    for i, (ids, labels) in enumerate(batch_example_tokens(tokenizer, rows, fmt, data_cfg)):
        trained_before = labels.count(IGNORE_INDEX) < len(labels)
        ids, labels, cut = truncate(ids, labels, data_cfg.max_length)
        stats.truncated += cut
        if labels.count(IGNORE_INDEX) == len(labels):
            stats.dropped_truncated += trained_before
            stats.dropped_unsupervised += not trained_before
        else:
            examples.append(Example(ids, labels, source, first_row + i))
    if progress is not None:
        progress(len(rows))
    return examples, stats
