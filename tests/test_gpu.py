"""CUDA paths that the CPU suite cannot reach: run on a GPU machine (`make test` runs them where CUDA is present).

    .venv/bin/python -m pytest tests/test_gpu.py -m gpu

FSDP with 4-bit QLoRA (bf16 storage of the 4-bit weights, the adapter gathered to rank 0's CPU) on 2 GPUs against
one process without FSDP. The same comparison runs on the CPU in tests/test_fsdp.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import assert_same_training, make_config, train

ROOT = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count()

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")]


def _qlora(config: Path) -> Path:
    config.write_text(config.read_text().replace(
        "  dtype: float32\n", "  dtype: bfloat16\n  quantization:\n    bits: 4\n    compute_dtype: bfloat16\n"))
    return config


def test_fsdp_qlora_on_two_gpus_trains_as_one_process(tmp_path, learnable_model_dir):
    n = 2
    one = _qlora(make_config(tmp_path, learnable_model_dir, name="one", batch_size=4, max_steps=3, precision="bf16"))
    many = _qlora(make_config(tmp_path, learnable_model_dir, name="many", batch_size=4 // n, max_steps=3,
                              precision="bf16"))
    assert train(one) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", str(n),
                           "-m", "lorafit", "train", str(many)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"processes: {n}, FSDP (full_shard)" in proc.stdout
    assert_same_training(tmp_path / "one", tmp_path / "many", rtol=2e-2)  # bf16 sums in another order
