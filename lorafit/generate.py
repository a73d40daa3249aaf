"""`lorafit generate`: text from a run, an adapter, or a merged model, streamed to stdout as it is produced.

The prompt is wrapped the way the run's training data was: the chat template (with the assistant turn opened) for
chat runs, the Alpaca prompt for alpaca runs, nothing for completion / text runs and models without a lorafit config.

Generation runs on `lorafit.inference` (the engine `lorafit serve` runs too); `decode` is its synchronous form: a
batch whose rows each have their own sampling settings and adapter. With `--adapter NAME=DIR` the base, the source's
adapter and each named adapter answer the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.inference.engine import decode
from lorafit.inference.load import as_base, load_inference_model, open_bank
from lorafit.inference.sampling import Completion, Sampling, check_sampling, pick_token
from lorafit.sources import Source, is_chat_run, load_source_tokenizer, resolve_source, stop_token_ids


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


__all__ = ["Completion", "Sampling", "as_base", "check_sampling", "decode", "generate_command", "open_bank",
           "parse_named", "pick_token", "prompt_ids"]


def _generate_several(src: Source, tokenizer, ids: list[int], stop: list[int], sampling: Sampling,
                      adapters: dict[str, Path]) -> dict[str, str]:
    model, bank, named = open_bank(src, adapters)
    names: list[str | None] = [None, *named]
    completions = decode(model, tokenizer, [ids] * len(names), [sampling] * len(names), stop,
                         adapters=names)  # one batch: every row the same prompt, each with its adapter
    replies = {}
    for name, completion in zip(["base", *named], completions, strict=True):
        print(f"── {name} ──\n{completion.text}", flush=True)
        replies[name] = completion.text
    return replies
