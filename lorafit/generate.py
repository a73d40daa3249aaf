"""`lorafit generate`: text from a run, an adapter, or a merged model, streamed to stdout as it is produced.

The prompt is wrapped the way the run's training data was: the chat template (with the assistant turn opened) for
chat runs, the Alpaca prompt for alpaca runs, nothing for completion / text runs and models without a lorafit config.
"""

from __future__ import annotations

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


def generate_command(source: Path, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0) -> str:
    """Generate a reply to `prompt`, streaming the new tokens to stdout.

    Args:
        source: a run directory, an adapter directory, or a model directory (e.g. from `lorafit merge`).
        prompt: the user's text (wrapped in the chat template / Alpaca prompt as the run was trained).
        max_new_tokens: most tokens to generate.
        temperature: 0 decodes greedily; above 0 samples with this temperature.
        top_p: nucleus sampling mass (with temperature > 0).

    Returns:
        The generated text (special tokens removed).

    Raises:
        RunDirError: a missing folder or one without an adapter or model. LorafitError: an empty prompt,
            bad sampling settings.
    """
    from transformers import GenerationConfig, TextStreamer

    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise LorafitError(f"generation settings: need --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1 "
                           f"(got {max_new_tokens}, {temperature}, {top_p})")
    src = resolve_source(Path(source), allow_model=True)
    tokenizer = load_source_tokenizer(src)
    ids = prompt_ids(tokenizer, src, prompt)
    model = load_inference_model(src)
    stop = stop_token_ids(tokenizer, src)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop,
                              pad_token_id=tokenizer.pad_token_id, **sampling)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints to stdout as it goes
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config, streamer=streamer)
    new = out[0, input_ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in stop), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True)
