"""`lorafit merge`: LoRA / rsLoRA / DoRA / QLoRA / PEFT adapters folded into the base reproduce the adapter, the
saved folder is a plain Hugging Face model, and bad output folders are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rundirs import ALPHA, R, make_run, randomize_adapter

from lorafit.adapters.peft_io import load_adapter
from lorafit.cli import main
from lorafit.errors import RunDirError
from lorafit.merge import MergeVerificationError, merge_adapter, sample_inputs

QLORA = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
INT8 = {"bits": 8}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _adapter_model(model_dir, adapter_dir):
    model = _load(model_dir)
    load_adapter(model, adapter_dir, dropout=0.0)
    return model.eval()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def ids(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer("Reverse the word: stone -> enots. def add(a, b):")["input_ids"]])


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_merged_model_reproduces_adapter_logits_when_alpha_differs_from_r(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                        ids, method):
    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, dora=method == "dora", rslora=method == "rslora")
    report = merge_adapter(run, tmp_path / "merged", dtype="float32")
    expected = _logits(_adapter_model(tiny_model_dir, run / "adapter"), ids)
    merged = _logits(_load(tmp_path / "merged"), ids)
    base = _logits(_load(tiny_model_dir), ids)
    assert _rel(expected, base) > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)  # measured: max |diff| ~1e-6
    assert report.max_rel_diff < 1e-5 and report.saved_rel_diff < 1e-5
    assert report.layers == 14 and report.adapter_effect > 1e-2


def test_saved_model_is_plain_hf_with_tokenizer_template_and_shards(tmp_path, tiny_model_dir, tiny_tokenizer):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, fmt="chat")
    out = tmp_path / "merged"
    merge_adapter(run, out, dtype="bfloat16", max_shard_size="100KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    keys = [k for s in shards for k in safe_open(str(s), "pt").keys()]
    assert keys and not any("lora" in k for k in keys)
    with safe_open(str(shards[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    model = _load(out)
    assert not any("lora" in k for k in model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    generation = json.loads((out / "generation_config.json").read_text())
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in generation["eos_token_id"]  # a chat model stops at the end of its turn
    assert not list(tmp_path.glob(".merged.tmp-*"))


@pytest.mark.parametrize("quant,naive_gap", [(QLORA, 3e-2), (INT8, 2e-3)])  # measured: 1.2e-1, 8.6e-3
def test_qlora_merge_equals_adapter_on_dequantized_base_not_on_original(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                        ids, quant, naive_gap):
    from lorafit.adapters import dequantized_weight, is_quantized
    from lorafit.model import load_model

    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, quantization=quant)
    report = merge_adapter(run, tmp_path / "merged", dtype="float32")
    merged = _logits(_load(tmp_path / "merged"), ids)

    # The reference, built independently: bitsandbytes' own 4-bit weights (before any forward), dequantized into
    # a float32 copy of the base, with the adapter applied unmerged.
    quantized = load_model(str(tiny_model_dir), dtype="float32", quantization=quant)
    reference = _load(tiny_model_dir)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if is_quantized(module):
                reference.get_submodule(name).weight.copy_(dequantized_weight(module).float())
    load_adapter(reference, run / "adapter", dropout=0.0)
    exact = _logits(reference, ids)
    naive = _logits(_adapter_model(tiny_model_dir, run / "adapter"), ids)  # the adapter on unquantized weights
    print(f"merged vs exact {_rel(merged, exact):.2e}, vs naive {_rel(merged, naive):.2e}, "
          f"vs kernel {report.kernel_rel_diff:.2e}")
    assert _rel(merged, exact) < 1e-4  # measured ~5e-7
    assert _rel(merged, naive) > naive_gap  # merging onto the original weights would be measurably wrong
    assert report.max_rel_diff < 1e-4 and report.saved_rel_diff < 1e-4 and report.saved_tolerance == 1e-4
    assert 0 < report.kernel_rel_diff < 3e-2  # vs bitsandbytes CPU kernels; measured 5.7e-3 (nf4), 9.7e-3 (int8)


def test_peft_saved_adapter_merges_like_peft(tmp_path, tiny_model_dir, ids):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_load(tiny_model_dir), LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True,
                                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    config = json.loads((tmp_path / "peft-adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    expected = _logits(peft_model.merge_and_unload(), ids)
    report = merge_adapter(tmp_path / "peft-adapter", tmp_path / "merged", dtype="float32")
    torch.testing.assert_close(_logits(_load(tmp_path / "merged"), ids), expected, rtol=1e-5, atol=1e-5)
    assert report.layers == 6


def test_zero_adapter_warns_and_merges_to_the_base(tmp_path, tiny_model_dir, tiny_tokenizer, ids, capsys):
    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, zero=True)
    report = merge_adapter(run, tmp_path / "merged", dtype="float32")
    assert "does not change the model" in capsys.readouterr().err
    assert report.adapter_effect == 0
    torch.testing.assert_close(_logits(_load(tmp_path / "merged"), ids), _logits(_load(tiny_model_dir), ids))


@pytest.mark.parametrize("broken", ["merge", "save"])
def test_failed_verification_exits_1_and_leaves_nothing(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch,
                                                         capsys, broken):
    import lorafit.merge as merge_module
    from lorafit.adapters import lora_layers, unwrap_lora

    def fold_without_merging(model):  # a merge that drops the adapter: the float32 check must catch it
        count = len(lora_layers(model))
        unwrap_lora(model, merge=False)
        return count

    save = merge_module.save_merged

    def save_a_wrong_weight(model, *args, **kwargs):  # a save that writes something else: the reload check catches it
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(3)
        save(model, *args, **kwargs)

    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer)
    if broken == "merge":
        monkeypatch.setattr(merge_module, "fold_adapter", fold_without_merging)
    else:
        monkeypatch.setattr(merge_module, "save_merged", save_a_wrong_weight)
    what = "merged float32 model" if broken == "merge" else "saved bfloat16 model"
    with pytest.raises(MergeVerificationError, match=f"verification failed: the {what}"):
        merge_adapter(run, tmp_path / "merged", dtype="bfloat16")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.tmp-*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(run), "--out", str(tmp_path / "merged")])
    assert exit_info.value.code == 1 and "verification failed" in capsys.readouterr().err


def test_empty_out_folder_is_used(tmp_path, tiny_model_dir, tiny_tokenizer):
    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer)
    (tmp_path / "merged").mkdir()
    merge_adapter(run, tmp_path / "merged", dtype="float16")
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.fixture
def run(tmp_path, tiny_model_dir, tiny_tokenizer):
    return make_run(tmp_path, tiny_model_dir, tiny_tokenizer)


@pytest.mark.parametrize("case,needle", [
    ("missing", "no such directory"),
    ("no-adapter", "no adapter"),
    ("not-a-run", "not a run or adapter directory"),
    ("non-empty-out", "not empty"),
    ("out-is-input", "is the input folder"),
    ("out-inside-input", "inside the input folder"),
])
def test_bad_inputs_are_one_clear_error_and_exit_2(tmp_path, run, case, needle, capsys):
    source, out = run, tmp_path / "merged"
    if case == "missing":
        source = tmp_path / "nope"
    elif case == "no-adapter":
        source = tmp_path / "unfinished"
        source.mkdir()
        (source / "config.yaml").write_text((run / "config.yaml").read_text())
    elif case == "not-a-run":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "non-empty-out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "out-is-input":
        out = run
    elif case == "out-inside-input":
        out = run / "merged"
    with pytest.raises(RunDirError, match=needle) as err:
        merge_adapter(source, out, dtype="float32")
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(source), "--out", str(out)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and needle in captured.err and "Traceback" not in captured.err
    if case == "non-empty-out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not (run / "merged").exists()


def test_sample_inputs_are_token_ids_of_fixed_texts(tiny_tokenizer):
    samples = sample_inputs(tiny_tokenizer)
    assert len(samples) >= 3 and all(s.shape[0] == 1 and s.shape[1] >= 2 for s in samples)
    assert torch.equal(samples[0], sample_inputs(tiny_tokenizer)[0])


def test_randomized_adapter_differs_from_zero(tiny_model):  # guards the fixtures the tests above rely on
    from lorafit.adapters import attach_lora, lora_layers

    attach_lora(tiny_model, "all-linear", r=R, alpha=ALPHA)
    randomize_adapter(tiny_model)
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(tiny_model).values())


# ------------------------------------------------------------------------------------------------ dtype and faults


def test_merge_saves_the_runs_dtype_by_default_and_a_float32_run_equals_its_adapter(tmp_path, tiny_model_dir,
                                                                                    tiny_tokenizer, ids, capsys):
    from safetensors.torch import load_file

    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer)  # model.dtype float32
    with pytest.raises(SystemExit) as info:
        main(["merge", str(run), "--out", str(tmp_path / "merged")])  # no --dtype
    assert info.value.code == 0, capsys.readouterr().err
    saved = {}
    for shard in (tmp_path / "merged").glob("*.safetensors"):
        saved.update(load_file(shard))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"
    expected = _logits(_adapter_model(tiny_model_dir, run / "adapter"), ids)
    assert _rel(_logits(_load(tmp_path / "merged"), ids), expected) < 1e-5  # measured 6.3e-7; bfloat16 gives 4.7e-3


def test_default_dtype_is_the_runs_or_the_bases_config_json(tmp_path, tiny_model_dir, tiny_tokenizer):
    from lorafit.merge import saved_dtype
    from lorafit.sources import resolve_source

    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer)
    assert saved_dtype(resolve_source(run)) == "float32"
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("dtype: float32", "dtype: float16", 1))
    assert saved_dtype(resolve_source(run)) == "float16"
    # a bare PEFT adapter (no lorafit.yaml): the dtype its base's config.json records
    bf16_base = tmp_path / "bf16-base"
    _load(tiny_model_dir).to(torch.bfloat16).save_pretrained(bf16_base)
    adapter = tmp_path / "peft-adapter"
    shutil.copytree(run / "adapter", adapter, ignore=shutil.ignore_patterns("lorafit.yaml"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(bf16_base)}))
    assert saved_dtype(resolve_source(adapter)) == "bfloat16"
    config["base_model_name_or_path"] = str(tiny_model_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert saved_dtype(resolve_source(adapter)) == "float32"


def test_disk_full_while_saving_the_merged_model_is_one_line_and_leaves_nothing(tmp_path, run, monkeypatch, capsys):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors (Rust) raises when the disk fills during save_pretrained
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(SystemExit) as info:
        main(["merge", str(run), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert info.value.code == 1
    assert line.startswith(f"error: no space left on device while writing the merged model to {tmp_path / 'merged'}")
    assert "free space" in line and "run the merge again" in line
    assert "lorafit failure" not in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.tmp-*"))
