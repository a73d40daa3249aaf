"""CUDA paths that the CPU suite cannot reach; each test is skipped without a GPU (`make gpu-check` runs them all).

    python -m pytest tests/test_gpu.py -m gpu

Each compares against an independent reference on the same device: an fp32 run for bf16 autocast, the loss-scale
arithmetic for fp16 (halved once per skipped step), PEFT for DoRA, torch's AdamW for the 8-bit paged optimizer,
per-example forwards for flash-attention's packed rows, an uninterrupted run for kill + resume (bit for bit), and one
process for two (DDP and FSDP). Bit-exact comparisons use eager attention: SDPA's memory-efficient backward on CUDA
accumulates with atomics, in no fixed order.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import _spawn, _wait_for, adapter_tensors, assert_same_training, make_config, metrics
from test_train import train as _train

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
EAGER = "model.attention=eager"


def train(config: Path, *args: str) -> int:
    """`lorafit train` in this process, with accelerate's process-wide state reset first, as a new process has it:
    several runs of one test may differ in precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return _train(config, *args)


def _loss_rows(run: Path) -> list[dict]:
    return [m for m in metrics(run) if "loss" in m]


def _learned(rows: list[dict], factor: float) -> bool:
    """The mean loss of the last 3 steps is below `factor` × the first step's (single batches are noisy)."""
    return sum(r["loss"] for r in rows[-3:]) / 3 < factor * rows[0]["loss"]


# ------------------------------------------------------------------------------------------------ precision


def test_bf16_autocast_follows_the_fp32_run_and_keeps_fp32_adapter_weights(tmp_path, learnable_model_dir):
    ref = make_config(tmp_path, learnable_model_dir, name="fp32", max_steps=16, precision="fp32")
    bf16 = make_config(tmp_path, learnable_model_dir, name="bf16", max_steps=16, precision="bf16")
    assert train(ref) == 0 and train(bf16) == 0
    a, b = _loss_rows(tmp_path / "fp32"), _loss_rows(tmp_path / "bf16")
    # Step 1 is the same weights and batch: only bf16 rounding of the matmuls separates the losses.
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=2e-2)
    assert _learned(b, 0.8)  # it learns (fp32 falls about as far)
    assert b[0]["memory_gib"] > 0  # measured by torch.cuda: the run was on the GPU
    tensors = adapter_tensors(tmp_path / "bf16")
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # autocast: master weights stay fp32


@pytest.fixture
def tiny_initial_loss_scale(monkeypatch):
    """Start fp16's loss scale at 2**24 (PyTorch's default is 2**16): the first steps overflow and are skipped."""
    import accelerate.accelerator as acc

    original = acc.get_grad_scaler
    monkeypatch.setattr(acc, "get_grad_scaler", lambda *a, **kw: original(*a, **{**kw, "init_scale": 2.0**24}))
    return 2.0**24


def _scale(checkpoint: Path) -> float:
    return float(torch.load(checkpoint / "scaler.pt", weights_only=False)["scale"])


def test_fp16_skips_overflowing_steps_and_resume_restores_the_loss_scale(tmp_path, learnable_model_dir,
                                                                         tiny_initial_loss_scale):
    common = dict(max_steps=12, save_every=4, keep_checkpoints=10, precision="fp16", scheduler="cosine")
    straight = make_config(tmp_path, learnable_model_dir, name="straight", **common)
    assert train(straight, EAGER) == 0
    rows = _loss_rows(tmp_path / "straight")
    skipped = [r["step"] for r in rows if not math.isfinite(r["grad_norm"])]
    first_kept = next(i for i, r in enumerate(rows) if math.isfinite(r["grad_norm"]))
    assert first_kept >= 1 and len(skipped) <= 8  # step 1 overflows at 2**24; a few halvings later, steps count
    assert all(math.isfinite(r["loss"]) for r in rows)
    # a skipped step does not advance the schedule: the first step taken runs at the first step's lr
    assert rows[first_kept]["lr"] == rows[0]["lr"]
    # GradScaler halves the scale once per skipped step and grows it only after 2000 clean ones
    ckpt4 = tmp_path / "straight" / "checkpoints" / "step-000004"
    assert _scale(ckpt4) == tiny_initial_loss_scale * 0.5 ** sum(s <= 4 for s in skipped)
    # Resume from step 4 in a copy: with the scale restored, it makes the same updates as the straight run.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(resumed / "adapter")
    for ckpt in (resumed / "checkpoints").glob("step-*"):
        if ckpt.name != "step-000004":
            shutil.rmtree(ckpt)
    config = make_config(tmp_path, learnable_model_dir, name="resumed", **common)
    (resumed / "config.yaml").write_text((resumed / "config.yaml").read_text().replace(
        str(tmp_path / "straight"), str(resumed)))
    assert train(config, EAGER, "--resume") == 0
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [repr(r["grad_norm"]) for r in _loss_rows(resumed)] == [repr(r["grad_norm"]) for r in rows]  # nan-safe


# ------------------------------------------------------------------------------------------------ quantized bases


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
QLORA = ["model.dtype=bfloat16", "model.quantization.bits=4", "model.quantization.type=nf4",
         "model.quantization.compute_dtype=bfloat16"]


@needs_bnb
def test_qlora_nf4_with_bf16_compute_trains_on_cuda_and_its_merge_verifies(tmp_path, learnable_model_dir):
    from lorafit.merge import MERGE_TOLERANCE, merge_adapter

    config = make_config(tmp_path, learnable_model_dir, max_steps=16, precision="bf16", gradient_checkpointing="true")
    assert train(config, *QLORA) == 0
    rows = _loss_rows(tmp_path / "run")
    assert _learned(rows, 0.8)
    report = merge_adapter(tmp_path / "run", tmp_path / "merged", dtype="bfloat16")
    assert report.max_rel_diff <= MERGE_TOLERANCE  # the fp32 merge vs the adapter on the dequantized base
    assert report.adapter_effect > 1e-3  # the trained adapter changes the model: the check above means something
    # the merged model against the adapter on the real CUDA 4-bit kernels (bf16 compute): close, not exact
    assert report.kernel_rel_diff is not None and report.kernel_rel_diff < 1e-1  # broken: ~1


@needs_bnb
def test_8bit_base_starts_at_the_full_precision_loss_trains_and_merges(tmp_path, learnable_model_dir):
    from lorafit.merge import merge_adapter

    ref = make_config(tmp_path, learnable_model_dir, name="fp", max_steps=1)
    int8 = make_config(tmp_path, learnable_model_dir, name="int8", max_steps=16)
    assert train(ref) == 0 and train(int8, "model.quantization.bits=8") == 0
    first = _loss_rows(tmp_path / "fp")[0]["loss"]
    rows = _loss_rows(tmp_path / "int8")
    assert rows[0]["loss"] == pytest.approx(first, rel=5e-2)  # LLM.int8 weights: the same model, rounded
    assert _learned(rows, 0.8)
    report = merge_adapter(tmp_path / "int8", tmp_path / "merged", dtype="float32")
    assert report.adapter_effect > 1e-3


@needs_bnb
def test_paged_adamw_8bit_first_update_matches_torch_adamw(tmp_path, learnable_model_dir, monkeypatch):
    import bitsandbytes as bnb

    import lorafit.train as lt

    built = []
    real_build = lt._build_optimizer
    monkeypatch.setattr(lt, "_build_optimizer", lambda *a, **kw: built.append(real_build(*a, **kw)) or built[-1])
    # r=32: A of down_proj (32 × 192) and B of gate/up (192 × 32) reach bitsandbytes' 4096-element minimum for
    # 8-bit state; smaller tensors keep 32-bit state
    common = dict(max_steps=1, lr=1e-3, max_grad_norm=0)
    ref = make_config(tmp_path, learnable_model_dir, name="adamw", optimizer="adamw", **common)
    paged = make_config(tmp_path, learnable_model_dir, name="paged", optimizer="paged_adamw_8bit", **common)
    assert train(ref, "adapter.r=32") == 0 and train(paged, "adapter.r=32") == 0
    optimizer = getattr(built[-1], "optimizer", built[-1])
    assert isinstance(optimizer, bnb.optim.PagedAdamW8bit)
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # 8-bit moments were used
    # Step 1 from B = 0: Adam moves each B weight by about lr · sign(grad); A has no gradient yet (B = 0).
    a, b = adapter_tensors(tmp_path / "adamw"), adapter_tensors(tmp_path / "paged")
    for k in (k for k in a if "lora_B" in k):
        moved = a[k].abs() > 0.5 * 1e-3
        assert moved.float().mean() > 0.5, k
        assert (torch.sign(a[k][moved]) == torch.sign(b[k][moved])).float().mean() > 0.99, k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0.1 * 1e-3)


# ------------------------------------------------------------------------------------------------ attention, DoRA


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn (flash_attention_2)")
def test_flash_attention_2_packed_row_equals_each_example_alone(tmp_path, learnable_model_dir):
    from transformers import AutoModelForCausalLM

    from lorafit.data import collate
    from lorafit.data.formats import Example
    from lorafit.data.packing import make_row

    gen = torch.Generator().manual_seed(5)
    examples = [Example(ids, [-100] + ids[1:]) for ids in
                (torch.randint(3, 300, (n,), generator=gen).tolist() for n in (37, 90, 11))]
    batch = collate([make_row(examples)], flatten=True)
    load = dict(dtype=torch.bfloat16, device_map={"": 0})
    fa2 = AutoModelForCausalLM.from_pretrained(learnable_model_dir, attn_implementation="flash_attention_2", **load)
    ref = AutoModelForCausalLM.from_pretrained(learnable_model_dir, attn_implementation="eager", **load)
    with torch.no_grad():
        packed = fa2(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                     use_cache=False).logits[0].float()
        alone = torch.cat([ref(input_ids=torch.tensor([e.input_ids]).cuda()).logits[0].float() for e in examples])
    # no token attends across an example boundary: each example's logits are its own (bf16 kernels differ)
    assert (packed - alone).abs().max() <= 3e-2 * alone.abs().max()
    config = make_config(tmp_path, learnable_model_dir, max_steps=3, precision="bf16")
    assert train(config, "model.attention=flash_attention_2", "model.dtype=bfloat16", "data.packing=true") == 0


def test_dora_trains_on_cuda_and_peft_reproduces_its_logits(tmp_path, learnable_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.adapters.peft_io import load_adapter

    config = make_config(tmp_path, learnable_model_dir, max_steps=16, precision="bf16")
    assert train(config, "adapter.method=dora") == 0
    rows = _loss_rows(tmp_path / "run")
    assert _learned(rows, 0.8)
    ids = torch.randint(3, len(tiny_tokenizer), (2, 19), generator=torch.Generator().manual_seed(3)).cuda()
    ours_model = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).cuda()
    load_adapter(ours_model, tmp_path / "run" / "adapter")
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32).cuda()
    theirs_model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    with torch.no_grad():
        ours, theirs = ours_model.eval()(ids).logits, theirs_model.eval()(ids).logits
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ resume


def test_sigkill_then_resume_on_cuda_is_bit_identical_to_an_uninterrupted_run(tmp_path, learnable_model_dir):
    common = dict(max_steps=16, save_every=4, batch_size=2, keep_checkpoints=100, precision="bf16")
    straight = make_config(tmp_path, learnable_model_dir, name="straight", **common)
    killed = make_config(tmp_path, learnable_model_dir, name="killed", **common)
    for cfg in (straight, killed):  # dropout on: the resumed run must restore the CUDA RNG too
        cfg.write_text(cfg.read_text().replace("dropout: 0.0", "dropout: 0.1"))
    assert train(straight, EAGER) == 0
    proc = _spawn(killed, EAGER)
    _wait_for(tmp_path / "killed" / "checkpoints" / "step-000008" / "state.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it was killed"
    assert train(killed, EAGER, "--resume") == 0
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["step"] for m in _loss_rows(tmp_path / "killed")] == list(range(1, 17))


# ------------------------------------------------------------------------------------------------ two GPUs


def _launch(config: Path, n: int, fsdp: bool) -> subprocess.CompletedProcess:
    launch = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")] if fsdp else ["--multi_gpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", str(n),
                           "-m", "lorafit", "train", str(config)], env=env, capture_output=True, text=True, timeout=600)


@two_gpus
def test_ddp_on_two_gpus_trains_as_one_process_with_the_whole_batch(tmp_path, learnable_model_dir):
    one = make_config(tmp_path, learnable_model_dir, name="one", batch_size=4, max_steps=3)
    many = make_config(tmp_path, learnable_model_dir, name="many", batch_size=2, max_steps=3)
    assert train(one) == 0
    proc = _launch(many, 2, fsdp=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "many", rtol=1e-3)  # NCCL sums in another order


def _qlora(config: Path) -> Path:
    config.write_text(config.read_text().replace(
        "  dtype: float32\n", "  dtype: bfloat16\n  quantization:\n    bits: 4\n    compute_dtype: bfloat16\n"))
    return config


@two_gpus
@needs_bnb
def test_fsdp_qlora_on_two_gpus_trains_as_one_process(tmp_path, learnable_model_dir):
    n = 2
    one = _qlora(make_config(tmp_path, learnable_model_dir, name="one", batch_size=4, max_steps=3, precision="bf16"))
    many = _qlora(make_config(tmp_path, learnable_model_dir, name="many", batch_size=4 // n, max_steps=3,
                              precision="bf16"))
    assert train(one) == 0
    proc = _launch(many, n, fsdp=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"processes: {n}, FSDP (full_shard)" in proc.stdout
    assert_same_training(tmp_path / "one", tmp_path / "many", rtol=2e-2)  # bf16 sums in another order
