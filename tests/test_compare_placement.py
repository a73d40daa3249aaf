"""scripts/compare_placement.py: the variants spend the same budget, keep uniform r's scale, and its table reads
the runs it made."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from test_train import make_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("compare_placement", ROOT / "scripts" / "compare_placement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_spend_about_the_uniform_budget_at_the_same_scale(script, tmp_path, learnable_model_dir):
    from lorafit.config import load_config
    from lorafit.plan import model_shape

    config = make_config(tmp_path, learnable_model_dir)
    variants = script.matched_overrides(config)
    assert set(variants) == set(script.VARIANTS)
    budget = model_shape(load_config(config).config).adapter_params
    for label in ("attention", "mlp"):
        a = load_config(config, variants[label]).config.adapter
        assert a.alpha / a.r == pytest.approx(12 / 4)
        assert abs(model_shape(load_config(config, variants[label]).config).adapter_params - budget) <= 0.1 * budget
    assert load_config(config, variants["allocate"]).config.adapter.allocate == "gradient"


def test_table_gives_mean_and_spread_over_seeds(script):
    runs = [{"trainable": 10, "loss": 1.0, "exact_match": 0.5}, {"trainable": 10, "loss": 2.0, "exact_match": 0.7}]
    summary = {"variant": "mlp", "seeds": 2, "trainable": 10, "loss": 1.5, "loss_sd": 0.7071, "exact_match": 0.6,
               "exact_match_sd": 0.1414, "runs": runs}
    text = script.table("quickstart", [summary, {"variant": "allocate", "error": "boom"}], "4 steps")
    assert "| mlp | 10 | 1.500 ± 0.707 | 0.60 ± 0.14 | 2 |" in text and "failed: boom" in text


def test_an_unfinished_run_is_summarised_from_its_log(script, tmp_path):
    log = tmp_path / "log"
    log.write_text('[quickstart] uniform [] ...\n'
                   '{"seed": 1, "method": "uniform", "trainable": 7, "loss": 1.0, "exact_match": 0.5, "probe_s": null}\n'
                   '{"seed": 2, "method": "uniform", "trainable": 7, "loss": 3.0, "exact_match": 0.5, "probe_s": null}\n'
                   '[quickstart] allocate ...\n'
                   '{"seed": 1, "method": "allocate", "trainable": 8, "loss": 2.0, "exact_match": 0.1, "probe_s": 2.0}\n'
                   '[small] uniform [] ...\n'
                   '{"seed": 1, "method": "uniform", "trainable": 9, "loss": 9.0, "exact_match": 0.0, "probe_s": null}\n')
    assert [s["loss"] for s in script.from_log(log, "small")] == [9.0]
    uniform, allocate = script.from_log(log, "quickstart")
    assert (uniform["variant"], uniform["seeds"], uniform["loss"]) == ("uniform", 2, 2.0)
    assert (allocate["variant"], allocate["seeds"], allocate["probe_s"]) == ("allocate", 1, 2.0)


def test_a_narrower_budget_keeps_the_scale_and_the_other_keys(script, tmp_path, learnable_model_dir):
    from lorafit.config import load_config

    config = make_config(tmp_path, learnable_model_dir)
    narrowed, label = script.narrowed(config, "quickstart", tmp_path / "q", 5, 2)
    cfg, original = load_config(narrowed).config, load_config(config).config
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.train.max_steps, label) == (2, 6.0, 5, "quickstart, r=2")
    assert cfg.adapter.targets == original.adapter.targets and cfg.data == original.data
    assert script.narrowed(config, "small", tmp_path / "s", 5, None) == (config, "small")  # steps: quickstart only
