"""Loss and perplexity on eval data; the training loop's eval and `lorafit eval` both use `evaluate_loss`.

`lorafit eval` (`evaluate_command`) measures the base model and the adapter on the same eval rows in one run: the
base by swapping each LoRA wrapper for the layer it wraps (one model load), then optional generation metrics (exact
match, contains, ROUGE-L) from greedy decoding of the first rows that have reference outputs.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.errors import DataError, RunDirError
from lorafit.inference.load import add_adapter, load_bank  # noqa: F401 - add_adapter: callers reach it here too


@torch.no_grad()
def evaluate_loss(model, rows: list[Any], accelerator, batch_size: int, pad_id: int | None,
                  lockstep: bool = False) -> dict[str, float]:
    """Mean token loss over `rows`, each process taking every world-th row, reduced across processes.

    Args:
        model: the (possibly wrapped) causal LM.
        rows: tokenized rows as `lorafit.data.build_datasets` returns them.
        accelerator: the run's Accelerator (device, autocast, reductions).
        batch_size: rows per forward pass.
        pad_id: the tokenizer's pad id for collation.
        lockstep: every process runs the same number of forward passes (FSDP gathers weights inside each one, with
            all processes); a process that has run out of rows repeats a row and ignores its loss.

    Returns:
        {"loss", "perplexity", "tokens"} where tokens counts supervised tokens on all processes.
    """
    from lorafit.data import collate
    from lorafit.loss import chunked_causal_lm_loss
    from lorafit.model import attention_in_use

    flatten = attention_in_use(model) == "flash_attention_2"  # FA2 separates packed examples in a batch of one only
    was_training = model.training
    model.eval()
    mine = rows[accelerator.process_index:: accelerator.num_processes]
    batches = math.ceil(len(mine) / batch_size)
    if lockstep:  # the first process has the most rows
        batches = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for start in range(0, batches * batch_size, batch_size):
        part = mine[start: start + batch_size]
        batch = collate(part or rows[:1], pad_id=pad_id, flatten=flatten)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with accelerator.autocast():  # supervised positions only, a chunk at a time: no (B, T, V) logits
            summed, count = chunked_causal_lm_loss(model, batch, labels)
        if part:
            loss_sum += summed.double()
            tokens += count
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    tokens = accelerator.reduce(tokens, reduction="sum")
    model.train(was_training)
    n = int(tokens.item())
    loss = loss_sum.item() / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if n else float("nan"), "tokens": n}


# ------------------------------------------------------------------------------------------ lorafit eval


class _SingleProcess:
    """The part of an Accelerator that `evaluate_loss` uses, for one process started without a launcher."""

    process_index = 0
    num_processes = 1

    def __init__(self, device: torch.device):
        self.device = device

    def autocast(self):
        return contextlib.nullcontext()  # the model runs in its own dtype; LoRA layers cast their inputs

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model for the duration of the block: each LoRA wrapper is swapped for the layer it wraps (shared
    weights, nothing copied) and put back afterwards, so base and adapter are measured on one loaded model."""
    from lorafit.adapters import lora_layers
    from lorafit.adapters.tokens import token_row_layers

    # Token rows too (the base has its own rows there); modules_to_save were loaded into the base in place and stay.
    layers = {**lora_layers(model), **token_row_layers(model)}
    for name, layer in reversed(layers.items()):  # innermost first: MoE expert layers nest
        model.set_submodule(name, layer.base_layer)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)


def _eval_inputs(source: Path, adapter_dir: Path | None):
    """(config, adapter folder) for a run folder, a lorafit adapter folder or a config file."""
    from lorafit.config import load_config
    from lorafit.sources import ADAPTER_CONFIG, LORAFIT_CONFIG, RUN_CONFIG, read_run_config

    if source.is_file():
        config = load_config(source).config
        adapter = adapter_dir or Path(config.output.dir) / "adapter"
    elif source.is_dir():
        config = read_run_config(source / RUN_CONFIG) or read_run_config(source / LORAFIT_CONFIG)
        if config is None:
            raise RunDirError(f"{source}: not a run directory (no {RUN_CONFIG}); give a run directory or a config file")
        adapter = adapter_dir or (source / "adapter" if (source / RUN_CONFIG).is_file() else source)
    else:
        raise RunDirError(f"{source}: no such run directory or config file")
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise RunDirError(f"{adapter}: no adapter here ({ADAPTER_CONFIG} is missing); train first "
                          f"(lorafit train CONFIG) or pass --adapter DIR")
    if not config.data.eval and config.data.eval_fraction <= 0:
        raise RunDirError(f"{source}: the run has no eval data; add data.eval sources (or data.eval_fraction: 0.05) "
                          f"to its config and run lorafit eval CONFIG --adapter {adapter}")
    return config, adapter


def _load_for_eval(config, adapter: Path):
    """The base as trained (quantized for QLoRA) with the adapter attached, its tokenizer, and the Source."""
    from lorafit.adapters.peft_io import read_adapter_config
    from lorafit.sources import Source, base_model_config, load_inference_model, load_source_tokenizer

    base = read_adapter_config(adapter).get("base_model_name_or_path")
    src = Source(adapter, "run", adapter, config, base_model_config(config, base, adapter))
    return load_inference_model(src), load_source_tokenizer(src), src


def _load_bank(config, adapters: dict[str, Path]):
    """The base as trained, loaded once, with every named adapter held on it (`AdapterBank`)."""
    from lorafit.sources import Source, load_source_tokenizer

    first = _adapter_folder(next(iter(adapters.values())))
    src = Source(first, "run", first, config, config.model)
    model, bank = load_bank(src, adapters)
    return model, load_source_tokenizer(src), src, bank


def evaluate_command(source: Path, adapter_dir: Path | None = None, json_path: Path | None = None,
                     console=None, generate_rows: int | None = None,
                     adapters: dict[str, Path] | None = None) -> dict[str, Any]:
    """`lorafit eval`: the base model and the adapter (or several named adapters) on the same eval data.

    Args:
        source: a run directory (its own eval split), a lorafit adapter folder, or a config file (its data, and
            `output.dir`'s adapter unless `adapter_dir` is given).
        adapter_dir: the adapter to compare with the base.
        json_path: also write the results here: {"base": {"loss", "perplexity", "tokens"}, "adapter": {...},
            "generation": {...}} (generation only when eval rows have reference outputs); with `adapters`,
            "adapters": {NAME: {...}} (and "adapter" too when there is exactly one).
        console: a rich Console (default: stdout).
        generate_rows: eval rows decoded greedily by each model for the generation metrics (default
            `GENERATION_ROWS`; 0 skips them).
        adapters: {NAME: adapter or run folder}: each measured on the same rows, the base loaded once.

    Returns:
        The results as written to JSON.

    Raises:
        RunDirError: missing run / adapter, or no eval data. DataError: unusable eval data.
    """
    from rich.console import Console

    from lorafit.data import IGNORE_INDEX, make_rows, prepare_examples
    from lorafit.sources import stop_token_ids

    console = console or Console(highlight=False)
    first = _adapter_folder(next(iter(adapters.values()))) if adapters else None
    config, adapter = _eval_inputs(Path(source), first or (Path(adapter_dir) if adapter_dir else None))
    if adapters:
        model, tokenizer, src, bank = _load_bank(config, adapters)
        variants = [("base", lambda: bank.use(None))] + [(n, lambda n=n: bank.use(n)) for n in adapters]
    else:
        model, tokenizer, src = _load_for_eval(config, adapter)
        variants = [("base", lambda: adapter_disabled(model)), ("adapter", contextlib.nullcontext)]
    if config.train.objective != "sft" and not adapters:  # pair accuracy / rewards instead of perplexity
        return _evaluate_preference_run(config, model, tokenizer, adapter, json_path, console)
    prepared = prepare_examples(config.data, tokenizer, seed=config.train.seed)
    rows = make_rows(prepared.eval, config.data.max_length, config.data.packing)
    if not any(lab != IGNORE_INDEX for r in rows for lab in r.labels):
        raise DataError("the eval data has no trained token (every eval row was dropped or is empty); check data.eval "
                        "or raise data.eval_fraction")
    limit = GENERATION_ROWS if generate_rows is None else generate_rows
    cases = generation_cases(prepared.eval, tokenizer, limit) if limit > 0 else []
    stop_ids = stop_token_ids(tokenizer, src)
    accelerator = _SingleProcess(next(model.parameters()).device)
    measured: dict[str, Any] = {}
    outputs: dict[str, list[str]] = {}
    for name, context in variants:
        with context():
            measured[name] = evaluate_loss(model, rows, accelerator, config.train.batch_size, tokenizer.pad_token_id)
            outputs[name] = generate_texts(model, tokenizer, cases, stop_ids) if cases else []
    results = _shaped(measured, list(adapters) if adapters else None)
    if cases:
        results["generation"] = generation_summary(cases, outputs, tokenizer, list(adapters) if adapters else None)
    if adapters:
        print_comparison(console, results)
    else:
        print_results(console, results, adapter)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    return results


def _evaluate_preference_run(config, model, tokenizer, adapter: Path, json_path, console) -> dict[str, Any]:
    """A dpo / simpo / orpo / kto run: `lorafit.preference.evaluate_preferences`. The reference is the base (the
    adapter off), or for a run that continued an adapter (adapter.from) base + that adapter, on a second copy."""
    from lorafit.preference import evaluate_preferences, print_preference_results, starting_adapter

    model.eval()
    variants = {"base": (model, lambda: adapter_disabled(model)), "adapter": (model, contextlib.nullcontext),
                "reference": (model, lambda: adapter_disabled(model))}
    parent = starting_adapter(config)
    if parent is not None:
        ref_model = _load_for_eval(config, parent)[0].eval()
        variants["reference"] = (ref_model, contextlib.nullcontext)
    results = evaluate_preferences(config, tokenizer, variants)
    print_preference_results(console, results, adapter)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    return results


def _adapter_folder(path: Path) -> Path:
    """The adapter folder of a run folder or an adapter folder."""
    path = Path(path)
    return path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path


def _shaped(measured: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    """{"base", "adapter"} for one unnamed adapter; {"base", "adapters": {NAME: ...}} (+ "adapter" for exactly one)."""
    if names is None:
        return dict(measured)
    results: dict[str, Any] = {"base": measured["base"], "adapters": {n: measured[n] for n in names}}
    if len(names) == 1:
        results["adapter"] = measured[names[0]]
    return results


# ------------------------------------------------------------------------------------- generation metrics


GENERATION_ROWS = 32  # eval rows decoded per model: enough for a signal, cheap next to the loss pass
GENERATION_MARGIN = 16  # new tokens allowed beyond the reference's length
GENERATION_BATCH = 8
SHOWN_SAMPLES = 3


@dataclass
class GenerationCase:
    """One eval example split into the prompt the model sees and the reference answer it was trained on."""

    prompt_ids: list[int]
    reference: str
    reference_tokens: int


def generation_cases(examples, tokenizer, limit: int = GENERATION_ROWS) -> list[GenerationCase]:
    """Prompt / reference pairs from tokenized eval examples, at most `limit`.

    The prompt is everything before the first trained token, the reference the first trained span (the response,
    or the first assistant turn). Examples trained from their start (text rows, train_on_prompt) have no prompt to
    complete and are skipped.
    """
    from lorafit.data import IGNORE_INDEX

    cases = []
    for e in examples:
        trained = [i for i, lab in enumerate(e.labels) if lab != IGNORE_INDEX]
        if not trained or trained[0] <= 1:  # labels[0] is never trained, so 1 means "from the start"
            continue
        start = end = trained[0]
        while end < len(e.labels) and e.labels[end] != IGNORE_INDEX:
            end += 1
        reference = tokenizer.decode(e.input_ids[start:end], skip_special_tokens=True).strip()
        cases.append(GenerationCase(list(e.input_ids[:start]), reference, end - start))
        if len(cases) == limit:
            break
    return cases


@torch.no_grad()
def generate_texts(model, tokenizer, cases: list[GenerationCase], stop_ids: list[int],
                   batch_size: int = GENERATION_BATCH) -> list[str]:
    """Greedy completions of each case's prompt, cut at a stop token or its reference length + margin; decoded by
    the inference engine, `batch_size` rows at a time (a row's answer does not depend on the others)."""
    from lorafit.inference.engine import decode
    from lorafit.inference.sampling import Sampling

    texts = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start: start + batch_size]
        samplings = [Sampling(max_new_tokens=c.reference_tokens + GENERATION_MARGIN) for c in batch]
        texts += [c.text.strip() for c in decode(model, tokenizer, [c.prompt_ids for c in batch], samplings,
                                                 stop_ids)]
    return texts


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, one row kept)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens: 2·P·R / (P + R) with P, R = LCS / length."""
    pred, ref = _normalize(prediction).split(), _normalize(reference).split()
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match, contains (the reference appears in the prediction) and ROUGE-L, each in [0, 1]."""
    n = len(references)
    if n == 0:
        return {"exact_match": float("nan"), "contains": float("nan"), "rouge_l": float("nan")}
    pairs = [(_normalize(p), _normalize(r)) for p, r in zip(predictions, references, strict=True)]
    return {"exact_match": sum(p == r for p, r in pairs) / n,
            "contains": sum(bool(r) and r in p for p, r in pairs) / n,
            "rouge_l": sum(rouge_l(p, r) for p, r in pairs) / n}


def generation_summary(cases: list[GenerationCase], outputs: dict[str, list[str]], tokenizer,
                       names: list[str] | None = None) -> dict[str, Any]:
    """The JSON's "generation" entry: scores per model and the first few samples side by side.

    `names`: named adapters (`outputs` keyed by them): scores under "adapters": {NAME: ...} (and "adapter" when there
    is one), each sample's texts under "adapters" too. Without: one adapter, under "adapter".
    """
    references = [c.reference for c in cases]
    tuned = names or ["adapter"]
    samples = []
    for i, c in enumerate(cases[:SHOWN_SAMPLES]):
        sample = {"prompt": tokenizer.decode(c.prompt_ids, skip_special_tokens=True), "reference": c.reference,
                  "base": outputs["base"][i]}
        if names is None or len(names) == 1:
            sample["adapter"] = outputs[tuned[0]][i]
        if names is not None:
            sample["adapters"] = {n: outputs[n][i] for n in names}
        samples.append(sample)
    summary = {"rows": len(cases), "decoding": "greedy", "max_new_tokens": f"reference length + {GENERATION_MARGIN}",
               "base": text_scores(outputs["base"], references)}
    if names is None or len(names) == 1:
        summary["adapter"] = text_scores(outputs[tuned[0]], references)
    if names is not None:
        summary["adapters"] = {n: text_scores(outputs[n], references) for n in names}
    summary["samples"] = samples
    return summary


# ------------------------------------------------------------------------------------------------ report


def _row(table, label: str, base: float, adapter: float, fmt: str, lower_is_better: bool | None) -> None:
    change = adapter - base
    colour = ""
    if lower_is_better is not None and change != 0:
        colour = "green" if (change < 0) == lower_is_better else "red"
    shown = f"{change:+{fmt}}" if not colour else f"[{colour}]{change:+{fmt}}[/]"
    table.add_row(label, f"{base:{fmt}}", f"{adapter:{fmt}}", shown if lower_is_better is not None else "")


def print_results(console, results: dict[str, Any], adapter: Path) -> None:
    """Base and adapter side by side in a table, then a few generations next to their references."""
    from rich.table import Table

    base, tuned = results["base"], results["adapter"]
    table = Table(title=f"eval: base vs adapter ({adapter})")
    for column in ("", "base", "adapter", "change"):
        table.add_column(column, justify="right" if column else "left")
    _row(table, "loss", base["loss"], tuned["loss"], ".4f", True)
    _row(table, "perplexity", base["perplexity"], tuned["perplexity"], ".3f", True)
    _row(table, "supervised tokens", base["tokens"], tuned["tokens"], ",d", None)
    generation = results.get("generation")
    if generation:
        for key, label in (("exact_match", "exact match"), ("contains", "contains"), ("rouge_l", "ROUGE-L")):
            _row(table, f"{label} ({generation['rows']} rows)", generation["base"][key], generation["adapter"][key],
                 ".3f", False)
    console.print(table)
    if generation and generation["samples"]:
        samples = Table(title="generations (greedy)", show_lines=True)
        for column in ("prompt (end)", "reference", "base", "adapter"):
            samples.add_column(column, overflow="fold")
        for s in generation["samples"]:
            samples.add_row(_tail(s["prompt"]), s["reference"], s["base"], s["adapter"])
        console.print(samples)


def _tail(text: str, n: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= n else "…" + text[-n:]


def print_comparison(console, results: dict[str, Any]) -> None:
    """The base and every named adapter side by side: one column per adapter, its change vs the base in brackets."""
    from rich.table import Table

    names = list(results["adapters"])
    table = Table(title=f"eval: base vs {len(names)} adapter(s)")
    for column in ("", "base", *names):
        table.add_column(column, justify="right" if column else "left")
    rows = [("loss", "loss", ".4f", True), ("perplexity", "perplexity", ".3f", True),
            ("supervised tokens", "tokens", ",d", None)]
    for label, key, fmt, lower in rows:
        table.add_row(label, f"{results['base'][key]:{fmt}}",
                      *(_cell(results["base"][key], results["adapters"][n][key], fmt, lower) for n in names))
    generation = results.get("generation")
    if generation:
        for key, label in (("exact_match", "exact match"), ("contains", "contains"), ("rouge_l", "ROUGE-L")):
            table.add_row(f"{label} ({generation['rows']} rows)", f"{generation['base'][key]:.3f}",
                          *(_cell(generation["base"][key], generation["adapters"][n][key], ".3f", False)
                            for n in names))
    console.print(table)
    if generation and generation["samples"]:
        samples = Table(title="generations (greedy)", show_lines=True)
        for column in ("prompt (end)", "reference", "base", *names):
            samples.add_column(column, overflow="fold")
        for s in generation["samples"]:
            samples.add_row(_tail(s["prompt"]), s["reference"], s["base"], *(s["adapters"][n] for n in names))
        console.print(samples)


def _cell(base: float, value: float, fmt: str, lower_is_better: bool | None) -> str:
    """`value` with its change vs `base` in brackets, green when better."""
    if lower_is_better is None:
        return f"{value:{fmt}}"
    change = value - base
    colour = "green" if change != 0 and (change < 0) == lower_is_better else "red" if change != 0 else ""
    shown = f"{change:+{fmt}}"
    return f"{value:{fmt}} ([{colour}]{shown}[/])" if colour else f"{value:{fmt}} ({shown})"
