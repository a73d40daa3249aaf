"""How one row is decoded: its settings, the next token from its logits, and its text as it grows (with stop
strings and streaming that never shows a piece it would take back)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lorafit.errors import LorafitError

MAX_UTF8 = 4  # bytes in the longest UTF-8 character


@dataclass
class Sampling:
    """How one row is decoded: greedy at temperature 0, else sampled (temperature, nucleus top_p), seeded or not."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # None: torch's global random state
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one
    stop_ids: Sequence[int] | None = None  # this row's stop tokens, instead of the batch's `stop_ids`


@dataclass
class Completion:
    """One decoded row: its new token ids (up to the stop), text, why it ended ("stop" / "length"), prompt size."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int


@dataclass
class RowText:
    """A row's output so far: tokens, decoded text, how much was streamed, and why it ended (None: still going)."""

    sampling: Sampling
    stops: set[int]
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed to the callback
    finish: str | None = None
    stalled: int = 0  # tokens in a row after which the text still ended in U+FFFD (an unfinished character)

    @classmethod
    def start(cls, sampling: Sampling, default_stops: Sequence[int]) -> RowText:
        stops = set(default_stops if sampling.stop_ids is None else sampling.stop_ids)
        seeded = torch.Generator(device="cpu").manual_seed(sampling.seed) if sampling.seed is not None else None
        return cls(sampling, stops, seeded)


def check_sampling(sampling: Sampling) -> None:
    """Raises LorafitError on settings no decoder can use (named as the CLI and the API name them)."""
    if sampling.max_new_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise LorafitError(f"generation settings: need max new tokens >= 1, temperature >= 0, 0 < top_p <= 1 (got "
                           f"{sampling.max_new_tokens}, {sampling.temperature}, {sampling.top_p})")


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row's logits (V,): argmax at temperature 0, else a draw from the temperature-scaled
    distribution cut to the smallest set of tokens whose probability reaches top_p."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # (V,)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # mass before it already reaches top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def advance(row: RowText, token: int, tokenizer, on_text: Callable[[str], None] | None) -> None:
    """Add one token to a row: end it at a stop token, a stop string or its budget; stream what is certain."""
    if token in row.stops:
        row.finish = "stop"
    else:
        row.tokens.append(token)
        row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((row.text.find(s) for s in row.sampling.stop if s and s in row.text), default=-1)
        if cut >= 0:
            row.text, row.finish = row.text[:cut], "stop"
        elif len(row.tokens) >= row.sampling.max_new_tokens:
            row.finish = "length"
    row.stalled = row.stalled + 1 if row.text.endswith("\ufffd") else 0
    if on_text is None:
        return
    # a character is at most 4 bytes: U+FFFD still there MAX_UTF8 tokens later is what the model wrote, not a part
    ready = len(row.text) if row.finish else certain_length(row.text, row.sampling.stop,
                                                            row.stalled >= MAX_UTF8)
    if ready > row.sent:
        on_text(row.text[row.sent: ready])
        row.sent = ready


def certain_length(text: str, stop: Sequence[str], replacement_final: bool = False) -> int:
    """How much of a growing text can be shown: not an incomplete character (a trailing U+FFFD, unless
    `replacement_final`), nor a tail that begins a stop string."""
    end = len(text) if replacement_final else len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end
