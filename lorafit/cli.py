"""The `lorafit` command line. Each command parses its arguments, loads what it needs, and calls one library function.

All user errors (`LorafitError`) pass through `main`, which prints one message and exits 2. Heavy imports (torch,
transformers) happen inside the commands so `lorafit --help` stays instant.
"""

from __future__ import annotations

import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
import typer.exceptions

from lorafit.errors import LorafitError, TrainingStopped, disk_full_reason

app = typer.Typer(
    name="lorafit",
    help="Fine-tune Hugging Face causal language models with LoRA and QLoRA, driven by YAML configs.\n\n"
    "Start with:  lorafit validate configs/tiny-quickstart.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

class SaveDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


ConfigArg = typer.Argument(..., help="The YAML config file.", show_default=False)
OverridesArg = typer.Argument(None, help="Overrides as dotted KEY=VALUE, e.g. train.lr=1e-4 adapter.r=8.",
                              show_default=False, metavar="[KEY=VALUE]...")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks (or set LORAFIT_DEBUG=1)."),
) -> None:
    """Fine-tune Hugging Face causal language models with LoRA and QLoRA, driven by YAML configs."""


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # logs and pipes: long paths stay on one line instead of being cut
        console.width = max(console.width, 160)
    return console


def _load(config: Path, overrides: list[str] | None):
    from lorafit.config import load_config

    loaded = load_config(config, overrides or [])
    err = _console(stderr=True)
    for warning in loaded.warnings:
        err.print(f"[yellow]warning:[/] {warning}")
    return loaded


@app.command()
def validate(
    config: Path = ConfigArg,
    overrides: Optional[list[str]] = OverridesArg,
    processes: Optional[int] = typer.Option(None, "--processes", min=1, show_default=False,
                                            help="Plan for N data-parallel processes (GPUs); default 1."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Plan for FSDP: weights and adapter state sharded across the "
                                                    "processes (as configs/accelerate/fsdp.yaml launches)."),
) -> None:
    """Check a config and show the plan: resolved config, model, targets, parameters, data, steps, memory.

    Nothing is trained and no weights are loaded. Memory is per device.

    Example:  lorafit validate configs/llama-8b-qlora.yaml train.batch_size=2 --processes 4
    Sharded:  lorafit validate configs/llama-70b-qlora.yaml --processes 2 --fsdp
    """
    from lorafit.plan import make_plan, print_plan

    loaded = _load(config, overrides)
    print_plan(_console(), loaded, make_plan(loaded.config, processes, fsdp=fsdp or None), show_config=True)


@app.command()
def train(
    config: Path = ConfigArg,
    overrides: Optional[list[str]] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in output.dir."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show the plan, then stop before training."),
) -> None:
    """Train a LoRA / QLoRA adapter as the config says; results go to output.dir.

    Example:  lorafit train configs/tiny-quickstart.yaml train.max_steps=50
    Several processes:  torchrun --nproc_per_node 2 -m lorafit train CONFIG
    Sharded (FSDP):  accelerate launch --config_file configs/accelerate/fsdp.yaml -m lorafit train CONFIG
    """
    loaded = _load(config, overrides)
    if dry_run:
        from lorafit.plan import make_plan, print_plan

        print_plan(_console(), loaded, make_plan(loaded.config), show_config=False)
        return
    from lorafit.train import run_training

    run_training(loaded, resume=resume)


@app.command()
def data(
    config: Path = ConfigArg,
    overrides: Optional[list[str]] = OverridesArg,
    examples: int = typer.Option(3, "--examples", min=0, help="How many rendered examples to show."),
) -> None:
    """Show what training will see: rendered examples with supervised tokens highlighted, token lengths,
    packing efficiency, and the label audit.

    Example:  lorafit data configs/tiny-quickstart.yaml --examples 5
    """
    from lorafit.data import print_data_report
    from lorafit.model import load_tokenizer

    loaded = _load(config, overrides)
    print_data_report(loaded.config, load_tokenizer(loaded.config.model), _console(), n_examples=examples)


@app.command()
def probe(
    config: Path = ConfigArg,
    overrides: Optional[list[str]] = OverridesArg,
    batches: Optional[int] = typer.Option(None, "--batches", min=1, show_default=False,
                                          help="Batches of data.train to read (default adapter.allocate_batches)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write scores and ranks to this JSON file.",
                                            show_default=False),
    heatmap: Path = typer.Option(Path("probe-heatmap.png"), "--heatmap", help="Layer × projection heatmap PNG."),
) -> None:
    """Gradient probe of the frozen base on data.train: every candidate target's score and the rank
    adapter.allocate: gradient would give it at the budget of uniform adapter.r.

    Example:  lorafit probe configs/tiny-quickstart.yaml --batches 4 --json probe.json
    """
    import json

    from lorafit.probe import print_probe, run_probe, write_heatmap

    result = run_probe(_load(config, overrides), n_batches=batches)
    console = _console()
    print_probe(console, result)
    console.print(f"heatmap: {write_heatmap(result, heatmap)}")
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        console.print(f"json: {json_out}")


@app.command()
def merge(
    sources: list[Path] = typer.Argument(..., help="Run or adapter directories (several: combined).",
                                         show_default=False, metavar="SOURCE..."),
    out: Path = typer.Option(..., "--out", help="New folder for the merged model (must not exist or be empty).",
                             show_default=False),
    dtype: Optional[SaveDtype] = typer.Option(None, "--dtype", show_default=False,
                                              help="Dtype of the saved weights (default: the run's model.dtype)."),
    weights: Optional[str] = typer.Option(None, "--weights", show_default=False, metavar="W1,W2,...",
                                          help="One weight per source (default 1 each)."),
    combine: Optional[str] = typer.Option(None, "--combine", show_default=False, metavar="sum|ties|dare|svd",
                                          help="How several sources combine (default sum: base + Σ wᵢ·ΔWᵢ)."),
    density: float = typer.Option(0.5, "--density", help="ties / dare: the share of each update kept."),
    rank: Optional[int] = typer.Option(None, "--rank", show_default=False,
                                       help="svd (and ties / dare with --as-adapter): rank of the result."),
    as_adapter: bool = typer.Option(False, "--as-adapter", help="Write one PEFT LoRA adapter instead of a model "
                                                                "(sum: exact, rank Σrᵢ; else rank --rank)."),
    seed: int = typer.Option(0, "--seed", help="dare: the random drop's seed."),
) -> None:
    """Fold an adapter into its base model and save a plain Hugging Face model; verified against the adapter.
    Several sources of one base are combined (sum, ties, dare, svd), into a model or one adapter.

    Example:  lorafit merge runs/tiny-quickstart --out merged/tiny --dtype float32
    Combined: lorafit merge runs/a runs/b --weights 0.7,0.3 --as-adapter --out adapters/ab
    """
    from lorafit.merge import CombineOptions, combine_adapters, merge_adapter

    chosen = dtype.value if dtype else None
    if len(sources) == 1 and weights is None and combine is None and rank is None and not as_adapter:
        merge_adapter(sources[0], out, dtype=chosen)
        return
    options = CombineOptions(weights=_parse_weights(weights), how=combine or "sum", density=density, rank=rank,
                             as_adapter=as_adapter, seed=seed)
    combine_adapters(sources, out, options, dtype=chosen)


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise LorafitError(f"--weights {text}: give numbers separated by commas, e.g. --weights 0.7,0.3") from None


@app.command(name="eval")
def evaluate(
    source: Path = typer.Argument(..., help="A run directory or a config file.", show_default=False,
                                  metavar="RUN_OR_CONFIG"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", show_default=False, metavar="DIR | NAME=DIR",
                                                help="Adapter to compare (default: the run's); NAME=DIR, repeated: "
                                                     "several adapters side by side, the base loaded once."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file.",
                                            show_default=False),
    generate_rows: int = typer.Option(32, "--generate", min=0,
                                      help="Eval rows each model answers greedily for exact match, contains and "
                                           "ROUGE-L (0 = loss only)."),
) -> None:
    """Measure the base model and the adapter side by side on the same eval data (loss, perplexity, and generation
    metrics on rows with reference answers).

    Example:  lorafit eval runs/tiny-quickstart --generate 50 --json results.json
    Compare:  lorafit eval runs/a --adapter a=runs/a --adapter b=runs/b --json results.json
    """
    from lorafit.evaluate import evaluate_command
    from lorafit.generate import parse_named

    single = adapter[0] if adapter and len(adapter) == 1 and "=" not in adapter[0] else None
    named = None if single is not None else parse_named(adapter)
    evaluate_command(source, adapter_dir=Path(single) if single else None, json_path=json_out,
                     generate_rows=generate_rows, adapters=named or None)


@app.command()
def generate(
    source: Path = typer.Argument(..., help="A run directory, an adapter directory or a merged model directory.",
                                  show_default=False, metavar="RUN_OR_MODEL_DIR"),
    prompt: str = typer.Option(..., "--prompt", help="The prompt (the chat template is applied for chat runs).",
                               show_default=False),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature)."),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", show_default=False, metavar="NAME=DIR",
                                                help="Also answer with this adapter (repeat for several): the base "
                                                     "is loaded once, every adapter gets the same prompt."),
) -> None:
    """Generate text from a trained adapter or a merged model.

    Example:  lorafit generate runs/tiny-quickstart --prompt "Repeat the word twice: stone"
    Compare:  lorafit generate runs/a --adapter b=runs/b --prompt "Reverse the word: stone"
    """
    from lorafit.generate import generate_command, parse_named

    generate_command(source, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     adapters=parse_named(adapter) or None)


@app.command()
def serve(
    source: Path = typer.Argument(..., help="A run directory, an adapter directory or a model directory.",
                                  show_default=False, metavar="RUN_OR_MODEL_DIR"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", show_default=False, metavar="NAME=DIR",
                                                help="Also serve this adapter under NAME (repeat for several)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", show_default=False,
                                          help="Require 'Authorization: Bearer KEY' on every request."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most requests decoded together (KV slots)."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", min=0.0,
                                        help="From idle, how long the first request waits for others to start with it."),
    max_loras: Optional[int] = typer.Option(None, "--max-loras", min=1, show_default=False,
                                            help="Adapters in the model (and in one step) at once; others wait on "
                                                 "the CPU and are swapped in (default: all)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", min=1, show_default=False,
                                            help="Requests that may wait; more get HTTP 429 (default: no limit)."),
    adapter_root: Optional[Path] = typer.Option(None, "--adapter-root", show_default=False, metavar="DIR",
                                                help="/v1/load_lora_adapter reads only below DIR."),
    runtime_loading: bool = typer.Option(True, "--runtime-loading/--no-runtime-loading",
                                         help="Offer /v1/load_lora_adapter and /v1/unload_lora_adapter."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, show_default=False,
                                          help="CPU threads for the model (default: one per core but one, which "
                                               "is left to HTTP and tokenizing)."),
    prefill_chunk: int = typer.Option(256, "--prefill-chunk", min=1,
                                      help="Prompt tokens read per step, all new requests together (long prompts "
                                           "never stall decoding)."),
) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API; the request's "model" picks the
    adapter, and requests for different adapters share one batch (continuous batching: a request joins at the next
    step and leaves when it ends). GET /health and GET /metrics (Prometheus) beside /v1.

    Example:  lorafit serve runs/a --adapter b=runs/b --port 8000
    Then:     curl localhost:8000/v1/completions -d '{"model": "b", "prompt": "Hello", "max_tokens": 20}'
    """
    from lorafit.generate import parse_named
    from lorafit.serve import serve_command

    serve_command(source, parse_named(adapter), host=host, port=port, api_key=api_key, max_batch=max_batch,
                  batch_wait=batch_wait_ms / 1000, max_loras=max_loras, max_queue=max_queue,
                  adapter_root=adapter_root, runtime_loading=runtime_loading, prefill_chunk=prefill_chunk,
                  threads=threads)


class ExportFormat(str, Enum):
    gguf = "gguf"
    gguf_lora = "gguf-lora"


class ExportDtype(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


@app.command()
def export(
    source: Path = typer.Argument(..., help="A run, adapter or model directory.", show_default=False,
                                  metavar="SOURCE"),
    out: Path = typer.Option(..., "--out", help="New folder for the GGUF file (must not exist or be empty).",
                             show_default=False),
    fmt: ExportFormat = typer.Option(ExportFormat.gguf, "--format",
                                     help="gguf: the merged model + an Ollama Modelfile; gguf-lora: the adapter "
                                          "alone, for llama.cpp's --lora."),
    dtype: ExportDtype = typer.Option(ExportDtype.f16, "--dtype", help="Tensor type (1-D tensors stay f32)."),
) -> None:
    """Export a run, adapter or model as GGUF for llama.cpp, Ollama and LM Studio (a run is merged on the fly).

    \b
    Example:  lorafit export runs/tiny-quickstart --out gguf/tiny --dtype q8_0
    Then:     ollama create tiny -f gguf/tiny/Modelfile
    Adapter:  lorafit export runs/tiny-quickstart --out gguf/tiny-lora --format gguf-lora
    """
    from lorafit.export import export as export_source

    export_source(source, out, fmt=fmt.value, dtype=dtype.value, console=_console())


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: user errors exit 2 with one message, interrupts 130, anything else 1 (traceback with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LORAFIT_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]  # accepted anywhere on the line, not only before the command
    first_process = os.environ.get("RANK", "0") == "0"  # under torchrun every rank meets the same user error
    try:
        code = app(args=args, prog_name="lorafit", standalone_mode=False)
    except typer.Exit as e:
        code = e.exit_code
    except typer.exceptions.TyperException as e:  # bad arguments: the usage message, exit 2
        e.show()
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        code = 130
    except LorafitError as e:
        if debug:
            traceback.print_exc()
        if first_process:
            print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    except TrainingStopped as e:
        if first_process:
            print(str(e), file=sys.stderr)
        code = e.exit_code
    except Exception as e:  # a bug, not the user's fault: say so, keep it short unless asked
        if debug:
            traceback.print_exc()
        elif disk_full_reason(e):  # a write the disk refused outside lorafit's guarded saves: not a bug either
            print(f"error: {disk_full_reason(e)} ({e.__class__.__name__}: {str(e).strip().splitlines()[0]}); free "
                  f"space and run the command again (lorafit train ... --resume continues a run from its newest "
                  f"checkpoint)", file=sys.stderr)
        else:
            print(f"error: {e.__class__.__name__}: {e}", file=sys.stderr)
            print("This is a lorafit failure, not a problem with your input. Run again with --debug for the "
                  "traceback, and report it.", file=sys.stderr)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
