"""`lorafit generate`: text from a run, an adapter, or a merged model, streamed to stdout as it is produced.

The prompt is wrapped the way the run's training data was: the chat template (with the assistant turn opened) for
chat runs, the Alpaca prompt for alpaca runs, nothing for completion / text runs and models without a lorafit config.

`decode` is the one generation loop: `lorafit generate` and `lorafit serve` both call it. It decodes a batch whose
rows each have their own sampling settings (and, through `AdapterBank.rows`, their own adapter) in one forward pass
per step. With `--adapter NAME=DIR` the base, the source's adapter and each named adapter answer the same prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.sources import Source, is_chat_run, load_inference_model, load_source_tokenizer, resolve_source, stop_token_ids


def prompt_ids(tokenizer, source: Source, prompt: str) -> list[int]:
    """Token ids of `prompt` as the run's training data presented prompts.

    Raises:
        LorafitError: an empty prompt, or a chat run whose tokenizer has no chat template.
    """
    from lorafit.data import alpaca_prompt

    if not prompt.strip():
        raise LorafitError("--prompt: is empty; give the text to continue or the question to answer")
    fmt = source.config.data.train[0].format if source.config is not None else "completion"
    if is_chat_run(source):
        if not getattr(tokenizer, "chat_template", None):
            raise LorafitError(f"{source.path}: a chat run, but its tokenizer has no chat template; set "
                               f"data.chat_template in the run's config")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its own BOS
    if fmt == "alpaca":
        prompt = alpaca_prompt(prompt, "", source.config.data.prompt_template)
    return list(tokenizer(prompt)["input_ids"])


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
class _Row:
    sampling: Sampling
    prompt_tokens: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed to the callback
    finish: str | None = None


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


@torch.no_grad()
def decode(model, tokenizer, prompts: list[list[int]], samplings: list[Sampling], stop_ids: Sequence[int],
           on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Decode a batch of prompts together, each row with its own settings: one forward pass per step for the batch.

    Prompts are left-padded (attention mask and position ids skip the padding), the KV cache grows one token per
    step, and each row ends at a stop token, a stop string, or its token budget; rows that ended are fed padding
    until the last one ends. Which adapter each row uses is the model's business (`AdapterBank.rows`).

    Args:
        model: a causal LM in eval mode.
        tokenizer: decodes the new tokens (special tokens skipped).
        prompts: token ids per row, each non-empty.
        samplings: one per row.
        stop_ids: token ids that end a row (EOS, end of turn); not part of the text.
        on_text: called as on_text(row, new_text) as each row's text grows (streaming); text that could still turn
            into a stop string, or an incomplete character, is held back until it cannot.

    Returns:
        One Completion per row, in order.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(stop_ids) or [0])[0]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T): each row counts from its first real token
    rows = [_Row(s, len(p), torch.Generator(device="cpu").manual_seed(s.seed) if s.seed is not None else None)
            for p, s in zip(prompts, samplings, strict=True)]
    cache_arg = {("cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"):
                 DynamicCache(config=model.config)}  # transformers 5.x renamed past_key_values to cache
    stops = set(stop_ids)
    for _ in range(max(s.max_new_tokens for s in samplings)):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_arg,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :].float().cpu()  # (B, V)
        for i, row in enumerate(rows):
            if row.finish is None:
                own = stops if row.sampling.stop_ids is None else set(row.sampling.stop_ids)
                _advance(row, i, pick_token(logits[i], row.sampling, row.generator), own, tokenizer, on_text)
        if all(row.finish is not None for row in rows):
            break
        chosen = [row.tokens[-1] if row.finish is None else pad for row in rows]
        ids = torch.tensor(chosen, device=device)[:, None]  # (B, 1)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)  # (B, T + tokens so far)
        positions = positions[:, -1:] + 1  # (B, 1)
    return [Completion(r.tokens, r.text, r.finish or "length", r.prompt_tokens) for r in rows]


def _advance(row: _Row, index: int, token: int, stops: set[int], tokenizer, on_text) -> None:
    """Add one token to a row: end it at a stop token, a stop string or its budget; stream what is certain."""
    if token in stops:
        row.finish = "stop"
    else:
        row.tokens.append(token)
        row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((row.text.find(s) for s in row.sampling.stop if s and s in row.text), default=-1)
        if cut >= 0:
            row.text, row.finish = row.text[:cut], "stop"
        elif len(row.tokens) >= row.sampling.max_new_tokens:
            row.finish = "length"
    if on_text is None:
        return
    ready = len(row.text) if row.finish else _certain_length(row.text, row.sampling.stop)
    if ready > row.sent:
        on_text(index, row.text[row.sent: ready])
        row.sent = ready


def _certain_length(text: str, stop: Sequence[str]) -> int:
    """How much of a growing text can be shown: not an incomplete character, nor a tail that begins a stop string."""
    end = len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return end


def parse_named(values: Sequence[str] | None, option: str = "--adapter") -> dict[str, Path]:
    """{NAME: DIR} from NAME=DIR values.

    Raises:
        LorafitError: a value without '=' (or with an empty name or folder), or a name given twice.
    """
    named: dict[str, Path] = {}
    for value in values or ():
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise LorafitError(f"{option} {value}: give NAME=DIR, e.g. {option} math=runs/math (a name, '=', and the "
                               f"adapter or run folder)")
        if name in named:
            raise LorafitError(f"{option} {value}: the name {name!r} is given twice; give each adapter its own name")
        named[name] = Path(folder)
    return named


def generate_command(source: Path, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, adapters: dict[str, Path] | None = None) -> str | dict[str, str]:
    """Generate a reply to `prompt`, streaming the new tokens to stdout.

    Args:
        source: a run directory, an adapter directory, or a model directory (e.g. from `lorafit merge`).
        prompt: the user's text (wrapped in the chat template / Alpaca prompt as the run was trained).
        max_new_tokens: most tokens to generate.
        temperature: 0 decodes greedily; above 0 samples with this temperature.
        top_p: nucleus sampling mass (with temperature > 0).
        adapters: {NAME: adapter folder}: the base (loaded once), the source's own adapter and each named one
            answer the same prompt in one batch; each reply is printed under its name.

    Returns:
        The generated text (special tokens removed); with `adapters`, {name: text} ("base", the source's adapter
        under its folder's name, then each NAME).

    Raises:
        RunDirError: a missing folder or one without an adapter or model. LorafitError: an empty prompt,
            bad sampling settings.
    """
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    check_sampling(sampling)
    src = resolve_source(Path(source), allow_model=True)
    tokenizer = load_source_tokenizer(src)
    ids = prompt_ids(tokenizer, src, prompt)
    stop = stop_token_ids(tokenizer, src)
    if adapters:
        return _generate_several(src, tokenizer, ids, stop, sampling, adapters)
    model = load_inference_model(src)
    completion = decode(model, tokenizer, [ids], [sampling], stop, on_text=lambda _, t: print(t, end="", flush=True))
    print(flush=True)
    return completion[0].text


def _generate_several(src: Source, tokenizer, ids: list[int], stop: list[int], sampling: Sampling,
                      adapters: dict[str, Path]) -> dict[str, str]:
    model, bank, named = open_bank(src, adapters)
    names: list[str | None] = [None, *named]
    with bank.rows(names):  # one batch: every row the same prompt, each with its adapter
        completions = decode(model, tokenizer, [ids] * len(names), [sampling] * len(names), stop)
    replies = {}
    for name, completion in zip(["base", *named], completions, strict=True):
        print(f"── {name} ──\n{completion.text}", flush=True)
        replies[name] = completion.text
    return replies


def open_bank(src: Source, adapters: dict[str, Path]):
    """The base of `src` loaded once, with the source's own adapter (named after its folder) and each named one.

    Returns:
        (model, AdapterBank, {name: folder} in the order loaded).

    Raises:
        LorafitError: a NAME equal to the source's own adapter's name. RunDirError: an adapter of another base.
    """
    from lorafit.evaluate import load_bank

    named = dict(adapters)
    if src.adapter_dir is not None:
        own = src.path.name
        if own in named:
            raise LorafitError(f"--adapter {own}=...: {own!r} names the source's own adapter ({src.path}); choose "
                               f"another name")
        named = {own: src.path, **named}
    model, bank = load_bank(src if src.adapter_dir is not None else _as_base(src), named)
    return model, bank, named


def _as_base(src: Source) -> Source:
    """A model folder as the base the named adapters go on (float32 on the CPU, bfloat16 on a GPU)."""
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return Source(src.path, src.kind, None, src.config, src.model.model_copy(update={"dtype": dtype}))
