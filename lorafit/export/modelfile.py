"""The Ollama Modelfile written beside an exported GGUF (`ollama create NAME -f DIR/Modelfile`).

- `FROM ./FILE.gguf`: relative, so the folder can be moved as a whole.
- `PARAMETER stop` for every token the model was trained to end its answer with (EOS, and for chat the end-of-turn
  token such as <|im_end|>): without them Ollama may run on past the answer.
- `TEMPLATE`: alpaca and completion runs get the prompt exactly as training framed it; chat runs (and models with a
  chat template) rely on the chat template stored in the GGUF metadata, which Ollama reads.
"""

from __future__ import annotations


def modelfile_text(gguf_name: str, src, tokenizer, stops: list[int]) -> str:
    """The Modelfile's text for `gguf_name` (a file in the same folder)."""
    lines = [f"FROM ./{gguf_name}"]
    for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(stops)):
        lines.append(f"PARAMETER stop {_quoted(token)}")
    template = prompt_template(src, tokenizer)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    return "\n".join(lines) + "\n"


def prompt_template(src, tokenizer) -> str | None:
    """Ollama's TEMPLATE (Go template syntax, {{ .Prompt }}) for runs that do not chat; None for chat."""
    from lorafit.data import alpaca_prompt
    from lorafit.sources import is_chat_run

    if is_chat_run(src):
        return None
    cfg = src.config
    if cfg is not None and cfg.data.train[0].format == "alpaca":
        return alpaca_prompt("{{ .Prompt }}", "", cfg.data.prompt_template)
    if cfg is None and tokenizer.chat_template:
        return None  # a model (or PEFT adapter) with its own chat template
    return "{{ .Prompt }}"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
