"""FSDP on the CPU: two gloo processes shard the model (`lorafit.parallel`) and must train as one process does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import straight_and_killed_runs, torchrun
from test_train import adapter_tensors, assert_same_training, make_config, metrics, train

from lorafit import parallel
from lorafit.errors import LorafitError

ROOT = Path(__file__).resolve().parents[1]


def _with_eval(config: Path) -> Path:
    """One held-out row for two processes: under FSDP the rank without a row must still join every forward."""
    config.write_text(config.read_text().replace("  packing: false", "  packing: false\n  eval_fraction: 0.02"))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fsdp_two_processes_at_batch_2_equal_one_at_batch_4(tmp_path, learnable_model_dir, grad_accum):
    one = _with_eval(make_config(tmp_path, learnable_model_dir, name="one", batch_size=4, grad_accum=grad_accum,
                                 max_steps=3))
    two = _with_eval(make_config(tmp_path, learnable_model_dir, name="two", batch_size=2, grad_accum=grad_accum,
                                 max_steps=3))
    assert train(one) == 0
    out = torchrun(two, fsdp=True)
    assert "processes: 2, FSDP (full_shard)" in out
    assert_same_training(tmp_path / "one", tmp_path / "two", rtol=1e-4)
    assert [m["step"] for m in metrics(tmp_path / "two") if "loss" in m] == [1, 2, 3]  # rank 0 alone writes
    assert out.count("done: 3 steps") == 1
    # the adapter was gathered whole: every tensor has its full shape, as the one-process run saved it
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    config = json.loads((tmp_path / "two" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]


@pytest.mark.slow
def test_fsdp_qlora_two_processes_equal_one(tmp_path, learnable_model_dir):
    """4-bit NF4 weights stored in the model's dtype so FSDP can shard them; the same training as one process."""
    runs = {}
    for name, batch in (("one", 4), ("two", 2)):
        cfg = make_config(tmp_path, learnable_model_dir, name=name, batch_size=batch, max_steps=3)
        text = cfg.read_text().replace("  dtype: float32\n", "  dtype: float32\n  quantization:\n    bits: 4\n"
                                                             "    compute_dtype: float32\n")
        cfg.write_text(text)
        runs[name] = cfg
    assert train(runs["one"]) == 0
    torchrun(runs["two"], fsdp=True)
    assert_same_training(tmp_path / "one", tmp_path / "two", rtol=1e-4)


@pytest.mark.slow
def test_fsdp_kill_and_resume_equals_a_straight_run(tmp_path, learnable_model_dir):
    killed = straight_and_killed_runs(tmp_path, learnable_model_dir, max_steps=12, kill_after=4, fsdp=True)
    newest = sorted((tmp_path / "killed" / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "state.json").read_text())["fsdp"] is True
    # a sharded run's optimizer state is keyed by parameter name: resuming without FSDP is refused, with the reason
    refused = torchrun(killed, "--resume", wait=False)
    _, err = refused.communicate(timeout=300)
    assert refused.returncode != 0 and "saved by a run with FSDP; resume it with the FSDP launch config" in err
    torchrun(killed, "--resume", fsdp=True)
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_fsdp_config(tmp_path, learnable_model_dir):
    config = make_config(tmp_path, learnable_model_dir, max_steps=2, batch_size=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
                           "-m", "lorafit", "train", str(config)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes: 2, FSDP (full_shard)" in proc.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_fsdp_request_is_read_from_the_launch_environment():
    assert parallel.requested_sharding({}) is None
    assert parallel.requested_sharding({"ACCELERATE_USE_FSDP": "false"}) is None
    got = parallel.requested_sharding({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "2",
                                       "FSDP_OFFLOAD_PARAMS": "true"})
    assert got == parallel.Sharding(strategy="SHARD_GRAD_OP", offload_params=True)
    assert parallel.requested_sharding({"ACCELERATE_USE_FSDP": "true"}).strategy == "FULL_SHARD"


@pytest.mark.parametrize("env, words", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "fsdp_version: 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULLSHARD"}, "FULL_SHARD, SHARD_GRAD_OP"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "3"}, "NO_SHARD shards nothing"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
])
def test_unsupported_launch_settings_are_refused_by_name(env, words):
    with pytest.raises(LorafitError, match=words):
        parallel.requested_sharding(env)


@pytest.mark.parametrize("settings, key", [
    (dict(quant_bits=8, dora=False, precision="bf16", optimizer="adamw"), "model.quantization.bits"),
    (dict(quant_bits=None, dora=True, precision="bf16", optimizer="adamw"), "adapter.method"),
    (dict(quant_bits=4, dora=False, precision="fp16", optimizer="adamw"), "train.precision"),
    (dict(quant_bits=4, dora=False, precision="bf16", optimizer="paged_adamw_8bit"), "train.optimizer"),
])
def test_what_fsdp_cannot_shard_is_refused_naming_the_key(settings, key):
    with pytest.raises(LorafitError, match=key):
        parallel.check_sharding_fits(**settings)
    parallel.check_sharding_fits(quant_bits=4, dora=False, precision="bf16", optimizer="adamw")  # QLoRA in bf16


def test_fsdp_with_dora_is_refused_before_loading_the_model(tmp_path, learnable_model_dir, monkeypatch, capsys):
    config = make_config(tmp_path, learnable_model_dir)
    config.write_text(config.read_text().replace("  r: 4\n", "  r: 4\n  method: dora\n"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert train(config) == 2
    err = capsys.readouterr().err
    assert "adapter.method: dora" in err and "Traceback" not in err


def test_shipped_fsdp_configs_plan_sharded_memory_below_one_gpu(capsys):
    from lorafit.cli import main

    fsdp_configs = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if "accelerate/fsdp.yaml" in p.read_text()]
    assert fsdp_configs
    for path in fsdp_configs:
        sharded, whole = [], []
        for args, out in ((["--processes", "2", "--fsdp"], sharded), ([], whole)):
            with pytest.raises(SystemExit) as info:
                main(["validate", str(path), *args])
            assert info.value.code == 0, capsys.readouterr().err
            text = capsys.readouterr().out
            out.append(float(text.split("memory (est.)")[1].split("GiB")[0]))
        assert sharded[0] < 0.7 * whole[0], path  # the weights, most of the memory, are split in two


def test_fsdp_wrapped_model_keeps_adapter_names_groups_and_files(tmp_path, tiny_model):
    """Inside FSDP every module path gains `_fsdp_wrapped_module` segments; LoRA+ groups, the adapter's layer names
    and the saved tensor names must still be the bare model's (one process: FSDP wraps without sharding)."""
    import torch.distributed as dist

    from lorafit.adapters import attach_lora, lora_layers, lora_state_dict, param_groups
    from lorafit.adapters.peft_io import save_adapter

    wrapped = attach_lora(tiny_model, ["q_proj", "v_proj"], r=4, alpha=8)
    expected = {k: v.clone() for k, v in lora_state_dict(tiny_model).items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = parallel.shard_model(tiny_model, parallel.Sharding(), torch.device("cpu"))
        assert any("_fsdp_wrapped_module" in n for n, _ in model.named_parameters())
        assert sorted(lora_layers(model)) == sorted(wrapped)
        groups = {g["name"]: g for g in param_groups(model, lr=1e-3, lora_plus_ratio=16)}
        assert set(groups) == {"lora_A", "lora_B"} and groups["lora_B"]["lr"] == 16e-3
        weights = parallel.trainable_state(model)
        assert sorted(weights) == sorted(k.removeprefix("base_model.model.") for k in expected)
        save_adapter(parallel.unwrap(model), tmp_path / "adapter", base_model_name_or_path=None, r=4, alpha=8,
                     dropout=0.0, targets=["q_proj", "v_proj"], weights=weights)
    finally:
        dist.destroy_process_group()
    saved = adapter_tensors(tmp_path)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
