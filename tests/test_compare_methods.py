"""scripts/compare_methods.py: the numbers it reads off a real run, and the table it writes into docs/methods.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from test_train import make_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "scripts" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_the_script_runs_is_a_valid_config(script, tmp_path, learnable_model_dir):
    from lorafit.config import load_config

    config = make_config(tmp_path, learnable_model_dir, max_steps=2)
    for label, overrides in script.RUNS.items():
        args = [f"train.lr={10 * 2e-3:g}" if o == "LR×10" else o for o in overrides]
        if label == "vera" or label == "vera_lr10":
            args = [a for a in args if not a.startswith("adapter.r=")]  # the test model is narrower than r=128
        assert load_config(config, args).config.adapter is not None, label


def test_measure_reads_the_runs_own_report_and_eval(script, tmp_path, learnable_model_dir, monkeypatch):
    config = make_config(tmp_path, learnable_model_dir, max_steps=3)
    config.write_text(config.read_text().replace("  packing: false", "  packing: false\n  eval_fraction: 0.2"))
    monkeypatch.setitem(script.RUNS, "lora_fa", ["adapter.method=lora_fa", "adapter.r=4"])
    result = script.measure("lora_fa", config, 2e-3, tmp_path / "out", generate=2)
    assert "error" not in result, result
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["adapter"]["method"] == "lora_fa"
    assert result["steps"] == 3
    assert result["trainable"] == sum(4 * out for out in _out_features(learnable_model_dir))  # LoRA-FA: B only
    adapter_bytes = (tmp_path / "out" / "adapter" / "adapter_model.safetensors").stat().st_size
    assert result["adapter_kib"] == adapter_bytes / 1024
    assert result["peak_gib"] > 0 and result["s_per_step"] > 0 and result["loss"] > 0
    assert 0.0 <= result["exact_match"] <= 1.0


def _out_features(model_dir: Path) -> list[int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    return [h, kv, kv, h, inter, inter, h] * layers  # q, k, v, o, gate, up, down


def test_tables_go_between_the_markers_and_the_rest_of_the_doc_stays(script, tmp_path):
    doc = tmp_path / "methods.md"
    doc.write_text(f"# head\n\n{script.TABLE_START}\nold\n{script.TABLE_END}\n\n## tail\n")
    rows = [{"method": "lora", "trainable": 1000, "adapter_kib": 4.0, "peak_gib": 0.5, "s_per_step": 0.1, "steps": 3,
             "wall_s": 1.0, "base_loss": 5.0, "loss": 1.5, "exact_match": 0.5},
            {"method": "vera", "error": "boom"}]
    script.write_doc(doc, script.table("quickstart", rows))
    text = doc.read_text()
    assert text.startswith("# head") and text.rstrip().endswith("## tail") and "old" not in text
    assert "| lora | 1,000 | 4 KiB | 0.50 GiB | 0.100 | 1.500 | 0.50 |" in text
    assert "| vera | failed: boom |" in text and "held-out loss 5.000" in text
    doc.write_text("no markers")
    with pytest.raises(SystemExit):
        script.write_doc(doc, "x")
