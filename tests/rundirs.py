"""Run folders for merge / eval / generate tests, made without the training loop: a tiny Llama with an adapter whose
B (and DoRA magnitude) are set to random nonzero values, saved as `lorafit train` saves a run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from lorafit.adapters import attach_lora, lora_layers
from lorafit.adapters.peft_io import save_adapter
from lorafit.config import load_config

R, ALPHA = 4, 12.0  # alpha != r, so a merge that forgot the scale would show

ALPACA_ROWS = [
    {"instruction": "Reverse the word.", "input": "stone", "output": "enots"},
    {"instruction": "Capitalize the word.", "input": "river", "output": "RIVER"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Count to five.", "input": "", "output": "1 2 3 4 5"},
]
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "hello, how are you?"},
                  {"role": "assistant", "content": "I am fine, thank you."}]},
    {"messages": [{"role": "user", "content": "Reverse the word: stone"}, {"role": "assistant", "content": "enots"}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_dict(run: Path, model_dir: Path, *, data_dir: Path | None = None, fmt: str = "alpaca", eval_data=True,
                quantization=None, dora=False, rslora=False, targets="all-linear") -> dict:
    """A resolved-config dict for a tiny run; writes its data files into `data_dir` (default: beside the run)."""
    data_dir = data_dir or run.parent
    rows = ALPACA_ROWS if fmt == "alpaca" else CHAT_ROWS
    train = write_jsonl(data_dir / f"train-{fmt}.jsonl", rows)
    data = {"train": [{"path": str(train), "format": fmt}], "max_length": 256, "packing": False}
    if eval_data:
        data["eval"] = [{"path": str(write_jsonl(data_dir / f"eval-{fmt}.jsonl", rows)), "format": fmt}]
    return {
        "model": {"path": str(model_dir), "dtype": "float32", "quantization": quantization},
        "adapter": {"method": "dora" if dora else "lora", "r": R, "alpha": ALPHA, "dropout": 0.0,
                    "targets": targets, "rslora": rslora},
        "data": data,
        "train": {"precision": "fp32", "seed": 3},
        "output": {"dir": str(run)},
    }


def randomize_adapter(model, seed: int = 11, dora: bool = False) -> None:
    """Nonzero B (and a DoRA magnitude away from ||W||), as after some training steps."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05, generator=gen)
            if dora:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.rand(layer.out_features, generator=gen))


def write_config(run: Path, cfg: dict) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def save_run(run: Path, model, tokenizer, cfg: dict) -> Path:
    """config.yaml + adapter/ (PEFT files, tokenizer, lorafit.yaml) as `lorafit train` leaves them."""
    config_file = write_config(run, cfg)
    resolved = load_config(config_file).config
    a = resolved.adapter
    save_adapter(model, run / "adapter", base_model_name_or_path=resolved.model.path, r=a.r, alpha=a.alpha,
                 dropout=a.dropout, targets=a.targets, rslora=a.rslora, dora=a.method == "dora", tokenizer=tokenizer)
    (run / "adapter" / "lorafit.yaml").write_text(resolved.to_yaml())
    config_file.write_text(resolved.to_yaml())
    return run


def make_run(tmp_path: Path, model_dir: Path, tokenizer, *, name: str = "run", zero: bool = False, **options) -> Path:
    """A finished run folder with a random nonzero adapter (all-zero B with `zero`) on the tiny Llama."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / name
    run.mkdir(parents=True)
    cfg = config_dict(run, model_dir, **options)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    a = cfg["adapter"]
    attach_lora(model, a["targets"], r=R, alpha=ALPHA, rslora=a["rslora"], dora=a["method"] == "dora")
    if not zero:
        randomize_adapter(model, dora=a["method"] == "dora")
    return save_run(run, model, tokenizer, cfg)


def base_model(model_dir: Path):
    """The saved base model, float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def with_adapter(model_dir: Path, run: Path):
    """The base model with `run`'s adapter attached alone (the reference for several adapters on one base)."""
    from lorafit.adapters.peft_io import load_adapter

    model = base_model(model_dir)
    load_adapter(model, run / "adapter", dropout=0.0)
    return model.eval()


def run_cli(*args: str) -> int:
    """`lorafit ARGS...` in this process; its exit code."""
    import pytest

    from lorafit.cli import main

    with pytest.raises(SystemExit) as info:
        main([*args])
    return info.value.code
