"""lorafit vs the usual transformers + peft + Trainer fine-tune, on the same model, data and LoRA settings.

    .venv/bin/python scripts/bench.py --size small               # CPU, ~25M-parameter Llama, one epoch (~5 min)
    .venv/bin/python scripts/bench.py --size tiny --repeats 3    # the tests' tiny Llama, seconds per run
    python scripts/bench.py --size 8b [--qlora] [--steps 20]     # one GPU: Llama-3.1-8B shape, bf16, seq 2048, MFU

Each run is a separate process (`python -m lorafit train CONFIG`, or this script with `--role baseline`); the order
alternates between repeats so that a busy machine hurts both sides alike. Both sides train one epoch of the same
tokenized examples (the baseline tokenizes through `lorafit.data` with packing off, so ids and prompt masks are
identical) with LoRA r=16, alpha=32, dropout 0 on every linear layer, AdamW, cosine schedule, the same lr, warmup,
grad-norm clip and seed. "Batch": the baseline takes `batch` examples per step padded to the longest
(DataCollatorForSeq2Seq, random order: no length grouping); lorafit takes packed rows of up to max_length tokens,
as many as make about the same number of optimizer steps per epoch (at least one row). Weights are random (built
here and saved to a temp dir) and the tokenizer is a byte-level BPE trained in-process: the timings need shapes, not
knowledge. With `--weights random` (the default for 8b) only config.json is written: each side builds the random
weights on its device at load time (`use_random_weights`), so no 16 GB checkpoint is written or read.

Reported per side (median over repeats): train time (the training loop), process wall time, real (non-pad) and
padded tokens/s, steady tokens/s (real tokens after the first step, which
pays for warm-up), peak memory (the child's peak RSS, VmHWM, on CPU; torch max allocated on GPU), and the final loss
(mean step loss over the last 10% of steps). On a GPU also MFU = tokens/s × FLOPs per token / peak FLOP/s with

    FLOPs per token = 4·N + 12·L·d·s̄

N = parameters of every matmul (all linear layers and the output head; the embedding lookup is free), 4·N = forward
(2N) + backward to the activations (2N): frozen base weights get no weight gradient; LoRA's own FLOPs (< 1%) are left
out. 12·L·d·s̄ is causal attention (QKᵀ and AV, 4·s·d forward, twice that backward) over L layers of width
d = heads × head_dim, s̄ = mean number of attended positions per token in its own example (packing does not widen
it). Both sides are charged the same formula, so the MFU ratio equals the steady tokens/s ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANDOM_WEIGHTS = "RANDOM_WEIGHTS.json"  # marker in a model folder whose weights are built at load
SIZES = {
    # the tests' tiny Llama (tests/conftest.py)
    "tiny": dict(model=dict(vocab_size=384, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2),
                 examples=400, max_words=200, max_length=512, batch=8, lr=2e-4, dtype="float32",
                 precision="fp32", checkpointing=False),
    # ~25M parameters, Llama-shaped
    "small": dict(model=dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=12,
                             num_attention_heads=6, num_key_value_heads=2),
                  examples=400, max_words=200, max_length=512, batch=8, lr=2e-4, dtype="float32",
                  precision="fp32", checkpointing=False),
    # Llama-3.1-8B's shape (random weights), for one GPU
    "8b": dict(model=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
               examples=800, max_words=900, max_length=2048, batch=8, lr=2e-4, dtype="bfloat16",
               precision="bf16", checkpointing=True),
}
LORA = dict(r=16, alpha=32, dropout=0.0)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, SXM parts


# ------------------------------------------------------------------------------------------------ data


def make_words(n: int, rng: random.Random) -> list[str]:
    """Pronounceable pseudo-words: a vocabulary a small BPE learns as one or two tokens each."""
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "s", "l"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.randint(1, 3))))
    return sorted(words)


TASKS = {  # instruction -> answer from the input words; answers from a word to the whole input
    "Repeat the words.": lambda ws: " ".join(ws),
    "Reverse the order of the words.": lambda ws: " ".join(reversed(ws)),
    "Sort the words.": lambda ws: " ".join(sorted(ws)),
    "How many words are there?": lambda ws: str(len(ws)),
    "Give the first three words.": lambda ws: " ".join(ws[:3]),
}


def make_examples(n: int, max_words: int, seed: int = 0) -> list[dict[str, str]]:
    """`completion`-format instruction rows whose token counts run from ~8 to ~2·max_words (long-tailed)."""
    rng = random.Random(seed)
    words = make_words(3000, rng)
    rows = []
    for _ in range(n):
        k = min(max_words, max(1, int(rng.paretovariate(1.1) * 6)))  # many short inputs, a long tail
        ws = [rng.choice(words) for _ in range(k)]
        instruction = rng.choice(list(TASKS))
        rows.append({"prompt": f"{instruction}\n{' '.join(ws)}\nAnswer:", "completion": " " + TASKS[instruction](ws)})
    return rows


# ------------------------------------------------------------------------------------------------ assets


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts`; <unk> doubles as pad (as lorafit picks), <s> BOS, </s> EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def build_model(out: Path, shape: dict, dtype: str, weights: str = "saved") -> int:
    """Save a random-weight Llama of `shape` in `dtype` to `out`; returns its parameter count.

    weights "random": save config.json and a `RANDOM_WEIGHTS` marker only; `use_random_weights` builds them at load.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    if weights == "random":
        cfg.save_pretrained(out)
        (out / RANDOM_WEIGHTS).write_text(json.dumps({"dtype": dtype, "seed": 0}))
        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # an 8B model is built (and initialised) on the GPU in seconds
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size="4GB")
    return sum(p.numel() for p in model.parameters())


def use_random_weights(model_dir: Path) -> None:
    """Make `AutoModelForCausalLM.from_pretrained(model_dir, ...)` build seeded random weights on this process's
    device instead of reading files (`build_model(weights="random")` wrote none); other paths load as usual.

    The weights go through from_pretrained's own `state_dict` path, so quantization, dtype and device placement
    are what a real load does. The build's transient memory is dropped from the CUDA peak afterwards.
    """
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__
    target = Path(model_dir).resolve()

    def from_pretrained(cls, path, *args, **kwargs):
        if not (Path(str(path)).resolve() == target and (target / RANDOM_WEIGHTS).is_file()):
            return original(cls, path, *args, **kwargs)
        for key in ("revision", "trust_remote_code"):  # meaningless without a path; from_pretrained(None) refuses some
            kwargs.pop(key, None)
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(target)
        model_cls = cls._model_mapping[type(config)]
        dtype = kwargs.get("dtype") or torch.float32
        torch.manual_seed(json.loads((target / RANDOM_WEIGHTS).read_text())["seed"])
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            state = model_cls._from_config(config, dtype=dtype).state_dict()
        model = model_cls.from_pretrained(None, *args, config=config, state_dict=state, **kwargs)
        del state
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return model

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)


def write_assets(work: Path, size: str, epochs: int, qlora: bool, examples: int | None = None,
                 weights: str = "saved") -> dict:
    """Model, tokenizer, data and the lorafit config under `work`; returns the run spec both sides read."""
    spec = dict(SIZES[size], examples=examples or SIZES[size]["examples"])
    rows = make_examples(spec["examples"], spec["max_words"])
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = work / "model"
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in rows], spec["model"]["vocab_size"])
    tokenizer.save_pretrained(model_dir)
    params = build_model(model_dir, spec["model"], spec["dtype"], weights)
    run = dict(size=size, model=str(model_dir), data=str(data), params=params, epochs=epochs, qlora=qlora, steps=None,
               **{k: v for k, v in spec.items() if k != "model"}, shape=spec["model"])
    (work / "spec.json").write_text(json.dumps(run, indent=1))
    return run


def lorafit_config(run: dict, rows_per_step: int, out_dir: Path) -> dict:
    """The lorafit config for `run` (JSON is YAML)."""
    quant = dict(bits=4, type="nf4", double_quant=True, compute_dtype="bfloat16") if run["qlora"] else None
    return {
        "model": {"path": run["model"], "dtype": run["dtype"], "attention": "sdpa", "quantization": quant},
        "adapter": {"method": "lora", "r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                    "targets": "all-linear"},
        "data": {"train": [{"path": run["data"], "format": "completion"}], "max_length": run["max_length"],
                 "packing": True, "train_on_prompt": False},
        "train": {"epochs": run["epochs"], "batch_size": rows_per_step, "grad_accum": 1, "lr": run["lr"],
                  "scheduler": "cosine", "warmup": 0.03, "optimizer": "adamw", "max_grad_norm": 1.0,
                  "precision": run["precision"], "gradient_checkpointing": run["checkpointing"], "seed": 42,
                  "log_every": 1, "max_steps": run["steps"]},
        "output": {"dir": str(out_dir)},
    }


def tokenized_rows(config_path: Path, packing: bool):
    """lorafit's rows for the config (packed or one example per row) and its tokenizer."""
    from lorafit.config import load_config
    from lorafit.data import build_datasets
    from lorafit.model import load_tokenizer

    cfg = load_config(config_path, [f"data.packing={str(packing).lower()}"]).config
    tokenizer = load_tokenizer(cfg.model)
    rows, _, _ = build_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    return rows, tokenizer, cfg


# ------------------------------------------------------------------------------------------------ children


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: per address space, so exec'ing from a big parent is not counted)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def role_lorafit(config: Path, result: Path) -> None:
    """`python -m lorafit train CONFIG`, in this process, then write its peak memory to `result`."""
    import atexit
    import runpy

    atexit.register(lambda: result.write_text(json.dumps({"peak_rss": peak_rss_bytes()})))
    from lorafit.config import load_config

    use_random_weights(Path(load_config(config).config.model.path))
    sys.argv = ["lorafit", "train", str(config)]
    runpy.run_module("lorafit", run_name="__main__", alter_sys=True)


class CountingCollator:
    """DataCollatorForSeq2Seq that also counts real (attention_mask) and padded (B × T) tokens, and each batch's."""

    def __init__(self, inner):
        self.inner, self.real, self.padded = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        self.real.append(int(batch["attention_mask"].sum()))
        self.padded.append(batch["input_ids"].numel())
        return batch


def step_clock():
    """A TrainerCallback that records when each optimizer step ends (after the GPU finished it)."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepClock()


def steady_tok_s(tokens: list[int], ends: list[float]) -> float | None:
    """Real tokens per second after the first step: tokens of steps 2..N over the time from step 1's end to N's.

    Args:
        tokens: each step's real tokens.
        ends: each step's end time (any clock; only differences count).
    """
    if len(ends) < 2 or ends[-1] <= ends[0]:
        return None
    return sum(tokens[1:len(ends)]) / (ends[-1] - ends[0])


def baseline_model(run: dict):
    """The base model with PEFT LoRA on all linear layers (k-bit prepared for QLoRA), as the usual recipe does."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if run["qlora"] else None
    device_map = {"": 0} if torch.cuda.is_available() else ("cpu" if quant else None)
    use_random_weights(Path(run["model"]))
    model = AutoModelForCausalLM.from_pretrained(run["model"], dtype=getattr(torch, run["dtype"]),
                                                 attn_implementation="sdpa", quantization_config=quant,
                                                 device_map=device_map)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=run["checkpointing"])
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def role_baseline(work: Path, result: Path) -> None:
    """transformers Trainer + peft on the same examples, unpacked, padded per batch; results to `result`."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lorafit import schedule

    run = json.loads((work / "spec.json").read_text())
    rows, tokenizer, _ = tokenized_rows(work / "lorafit.yaml", packing=False)
    # a plain list is a map-style dataset to the Trainer: no `datasets` package needed on the GPU machine
    dataset = [{"input_ids": r.input_ids, "attention_mask": [1] * len(r), "labels": r.labels} for r in rows]
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    gpu = torch.cuda.is_available()
    total = math.ceil(len(rows) / run["batch"]) * run["epochs"]
    if run["steps"]:
        total = min(total, run["steps"])
    args = TrainingArguments(
        output_dir=str(work / "baseline-out"), per_device_train_batch_size=run["batch"], gradient_accumulation_steps=1,
        num_train_epochs=run["epochs"], learning_rate=run["lr"], lr_scheduler_type="cosine",
        warmup_steps=schedule.warmup_steps(0.03, total), weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused" if gpu else "adamw_torch", bf16=run["precision"] == "bf16", use_cpu=not gpu,
        gradient_checkpointing=run["checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="random", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=42, data_seed=42, dataloader_num_workers=0, remove_unused_columns=False, max_steps=total)
    clock = step_clock()
    trainer = Trainer(model=baseline_model(run), args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # the data loader fetches one batch ahead: the collator may have seen one batch more than was trained
    steps = len(losses)
    result.write_text(json.dumps({
        "train_s": train_s, "real_tokens": sum(collator.real[:steps]), "padded_tokens": sum(collator.padded[:steps]),
        "steps": steps, "steady_tok_s": steady_tok_s(collator.real, clock.ends),
        "losses": losses, "gpu_peak": torch.cuda.max_memory_allocated() if gpu else None,
        "peak_rss": peak_rss_bytes()}))


# ------------------------------------------------------------------------------------------------ the parent


def plan(work: Path, run: dict) -> dict:
    """Both sides' shapes of one epoch: rows per lorafit step (same steps per epoch), lorafit's padded tokens, s̄."""
    from lorafit import schedule

    packed, _, _ = tokenized_rows(work / "lorafit.yaml", packing=True)
    examples, _, _ = tokenized_rows(work / "lorafit.yaml", packing=False)
    lengths = [len(e) for e in examples]
    base_steps = math.ceil(len(examples) / run["batch"])
    rows_per_step = max(1, round(len(packed) / base_steps))
    per_epoch = schedule.steps_per_epoch(len(packed), rows_per_step)
    lorafit_steps = min(per_epoch * run["epochs"], run["steps"] or math.inf)
    baseline_steps = min(base_steps * run["epochs"], run["steps"] or math.inf)
    padded = 0
    for step in range(lorafit_steps):  # the rows lorafit's loop will take, as it takes them
        epoch, in_epoch = divmod(step, per_epoch)
        order = schedule.epoch_order(len(packed), 42, epoch)
        for mb in schedule.micro_batches(order, in_epoch, rows_per_step, 1, 0, 1):
            padded += len(mb) * max(len(packed[i]) for i in mb)
    return dict(examples=len(examples), rows=len(packed), rows_per_step=rows_per_step, lorafit_padded=padded,
                lorafit_steps=lorafit_steps, baseline_steps=baseline_steps,
                min_len=min(lengths), max_len=max(lengths), mean_len=statistics.mean(lengths),
                supervised=sum(sum(t != -100 for t in e.labels[1:]) for e in examples) / sum(lengths),
                mean_context=sum(n * (n + 1) / 2 for n in lengths) / sum(lengths))


def run_child(kind: str, work: Path, index: int, plan_: dict) -> dict:
    """One training process; returns its measurements."""
    result = work / f"{kind}-{index}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", kind, "--work", str(work), "--result", str(result)]
    if kind == "lorafit":
        config = work / f"lorafit-{index}.yaml"
        spec = json.loads((work / "lorafit.yaml").read_text())
        spec["output"]["dir"] = str(work / f"run-{index}")
        config.write_text(json.dumps(spec, indent=1))
        cmd += ["--config", str(config)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not result.exists():
        sys.exit(f"{kind} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    if kind == "lorafit":
        out.update(lorafit_metrics(work / f"run-{index}" / "metrics.jsonl"), padded_tokens=plan_["lorafit_padded"])
    return dict(out, wall_s=wall)


def lorafit_metrics(path: Path) -> dict:
    """Train time, tokens, step losses and GPU peak from a run's metrics.jsonl (one row per step: log_every 1)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step" in r and "loss" in r and "tokens" in r]
    last = steps[-1]
    import torch

    gpu = torch.cuda.is_available()
    real = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + steps, steps)]
    return {"train_s": last["elapsed"], "real_tokens": last["tokens"], "steps": len(steps),
            "losses": [r["loss"] for r in steps], "gpu_peak": last["memory_gib"] * 2**30 if gpu else None,
            "steady_tok_s": steady_tok_s(real, [r["elapsed"] for r in steps])}


def summarize(runs: list[dict], flops_per_token: float | None, peak_flops: float | None) -> dict:
    """Medians over repeats of one side."""
    med = lambda key: statistics.median(key(r) for r in runs)  # noqa: E731
    tail = lambda r: statistics.mean(r["losses"][-max(1, len(r["losses"]) // 10):])  # noqa: E731
    real = med(lambda r: r["real_tokens"] / r["train_s"])
    out = {"train_s": med(lambda r: r["train_s"]), "wall_s": med(lambda r: r["wall_s"]), "real_tok_s": real,
           "padded_tok_s": med(lambda r: r["padded_tokens"] / r["train_s"]),
           "steady_tok_s": med(lambda r: r["steady_tok_s"] or r["real_tokens"] / r["train_s"]),
           "peak_gib": med(lambda r: (r["gpu_peak"] or r["peak_rss"]) / 2**30), "final_loss": med(tail),
           "steps": runs[0]["steps"], "each_real_tok_s": [round(r["real_tokens"] / r["train_s"]) for r in runs]}
    if flops_per_token and peak_flops:  # at the steady rate: the first step's warm-up is not the model's speed
        out["mfu"] = out["steady_tok_s"] * flops_per_token / peak_flops
    return out


def flops_per_token(shape: dict, mean_context: float) -> float:
    """4·N (matmul parameters incl. the head) + 12·L·d·s̄ (causal attention), forward + backward, frozen base."""
    h, layers, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    hd = h // heads
    kv = shape["num_key_value_heads"] * hd
    per_layer = h * heads * hd * 2 + h * kv * 2 + 3 * h * shape["intermediate_size"]  # q, o; k, v; gate, up, down
    n = layers * per_layer + h * shape["vocab_size"]
    return 4 * n + 12 * layers * heads * hd * mean_context


def gpu_peak_flops(override_tflops: float | None) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name()
    return next((t * 1e12 for key, t in PEAK_TFLOPS.items() if key in name), None)


def table(sides: dict[str, dict]) -> str:
    """A markdown table, one row per side and the lorafit / baseline ratios."""
    mfu = "mfu" in sides["lorafit"]
    head = ["", "train s", "wall s", "real tok/s", "padded tok/s", "steady tok/s", "peak mem GiB", "final loss",
            "steps"]
    lines = ["| " + " | ".join(head + (["MFU"] if mfu else [])) + " |", "|" + "---|" * (len(head) + mfu)]
    for name, s in sides.items():
        cells = [name, f"{s['train_s']:.1f}", f"{s['wall_s']:.1f}", f"{s['real_tok_s']:.0f}",
                 f"{s['padded_tok_s']:.0f}", f"{s['steady_tok_s']:.0f}", f"{s['peak_gib']:.2f}", f"{s['final_loss']:.3f}",
                 str(s["steps"])]
        lines.append("| " + " | ".join(cells + ([f"{s['mfu']:.1%}"] if mfu else [])) + " |")
    a, b = sides["lorafit"], sides["baseline"]
    ratio = ["lorafit / baseline"] + [f"{a[k] / b[k]:.2f}×" for k in
                                     ("train_s", "wall_s", "real_tok_s", "padded_tok_s", "steady_tok_s", "peak_gib",
                                      "final_loss")]
    lines.append("| " + " | ".join(ratio + ["", f"{a['mfu'] / b['mfu']:.2f}×" if mfu else ""][: 1 + mfu]) + " |")
    return "\n".join(lines)


def environment() -> str:
    import platform

    import accelerate
    import peft
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}")


def bench(args: argparse.Namespace) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix=f"lorafit-bench-{args.size}-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LORAFIT_CACHE", str(work / "cache"))  # children inherit it: tokenize once
    print(f"building the {args.size} model, tokenizer and data in {work} ...", flush=True)
    weights = args.weights or ("random" if args.size == "8b" else "saved")
    run = write_assets(work, args.size, args.epochs, args.qlora, args.examples, weights)
    run["steps"] = args.steps
    (work / "spec.json").write_text(json.dumps(run, indent=1))
    (work / "lorafit.yaml").write_text(json.dumps(lorafit_config(run, 1, work / "run"), indent=1))
    p = plan(work, run)
    spec = json.loads((work / "lorafit.yaml").read_text())
    spec["train"]["batch_size"] = p["rows_per_step"]
    (work / "lorafit.yaml").write_text(json.dumps(spec, indent=1))
    print(f"model {run['params'] / 1e6:.1f}M parameters; {p['examples']} examples of {p['min_len']}-{p['max_len']} "
          f"tokens (mean {p['mean_len']:.0f}, {p['supervised']:.0%} supervised) -> {p['rows']} packed rows; "
          f"baseline {run['batch']} examples/step ({p['baseline_steps']} steps), lorafit {p['rows_per_step']} "
          f"rows/step ({p['lorafit_steps']} steps)", flush=True)
    results: dict[str, list[dict]] = {"lorafit": [], "baseline": []}
    for i in range(args.repeats):
        for kind in (["lorafit", "baseline"] if i % 2 == 0 else ["baseline", "lorafit"]):
            r = run_child(kind, work, i, p)
            results[kind].append(r)
            print(f"  repeat {i + 1} {kind}: {r['train_s']:.1f} s, {r['real_tokens'] / r['train_s']:.0f} real tok/s, "
                  f"loss {r['losses'][-1]:.3f}", flush=True)
    fpt = flops_per_token(run["shape"], p["mean_context"])
    sides = {k: summarize(v, fpt, gpu_peak_flops(args.peak_tflops)) for k, v in results.items()}
    print(f"\n{environment()}\nsize {args.size}, {args.epochs} epoch(s), {args.repeats} repeat(s) (medians); "
          f"FLOPs/token {fpt / 1e9:.3f} G\n")
    print(table(sides))
    if args.json:
        Path(args.json).write_text(json.dumps({"run": run, "plan": p, "sides": sides, "runs": results}, indent=1))


def role_loss_ablation(work: Path, steps: int) -> None:
    """Forward + backward of lorafit's packed batches with the plain and the chunked loss, alternating; ms/step."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit import data, loss
    from lorafit.adapters import attach_lora

    rows, _, cfg = tokenized_rows(work / "lorafit.yaml", packing=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    attach_lora(model, "all-linear", r=LORA["r"], alpha=LORA["alpha"])
    model.train()
    batches = [data.collate(rows[i: i + cfg.train.batch_size]) for i in range(0, len(rows), cfg.train.batch_size)]
    plain = lambda m, b, lab: data.causal_lm_loss(m(**b, use_cache=False).logits, lab)  # noqa: E731
    times: dict[str, list[float]] = {"plain": [], "chunked": []}
    for i in range(steps):
        for name in (["plain", "chunked"] if i % 2 == 0 else ["chunked", "plain"]):
            batch = dict(batches[i % len(batches)])
            labels = batch.pop("labels")
            start = time.perf_counter()
            (plain if name == "plain" else loss.chunked_causal_lm_loss)(model, batch, labels)[0].backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t[1:]) * 1e3:.1f} ms per micro-batch over {len(t) - 1} steps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python scripts/bench.py --size small --repeats 2")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per side; the order alternates")
    ap.add_argument("--examples", type=int, default=None, help="training examples (default: the size's own)")
    ap.add_argument("--qlora", action="store_true", help="4-bit NF4 base on both sides")
    ap.add_argument("--steps", type=int, default=None, help="stop each side after this many optimizer steps")
    ap.add_argument("--weights", choices=["saved", "random"], default=None,
                    help="random: build the random weights on the device at load, write none (default for 8b)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--work", default=None, help="working folder (default: a new temp folder, kept)")
    ap.add_argument("--json", default=None, help="also write every measurement here")
    ap.add_argument("--role", choices=["bench", "lorafit", "baseline", "loss"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size == "8b" and args.role == "bench":
        import torch

        if not torch.cuda.is_available():
            ap.error("--size 8b needs a CUDA GPU (bf16, ~16 GB of weights; ~6 GB with --qlora)")
    if args.qlora and args.size == "small":
        ap.error("--qlora on --size small: bitsandbytes' CPU 4-bit kernels make that a long run; use tiny or 8b")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role == "lorafit":
        role_lorafit(Path(args.config), Path(args.result))
    elif args.role == "baseline":
        role_baseline(Path(args.work), Path(args.result))
    elif args.role == "loss":  # the chunked loss alone, on a built --work folder: --role loss --work DIR
        role_loss_ablation(Path(args.work), steps=2 * args.repeats + 1)
    else:
        bench(args)


if __name__ == "__main__":
    main()
