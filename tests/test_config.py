"""Config loading: schema, extends, overrides, cross-field checks, and the messages users see."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lorafit.config import config_diff, load_config, parse_override
from lorafit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts)
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))

MINIMAL = """
model:
  path: some/model
data:
  train:
    - path: data/train.jsonl
      format: alpaca
output:
  dir: runs/test
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def minimal_with(snippet: str) -> str:
    """MINIMAL with `snippet`'s sections merged in (a plain append would repeat top-level keys)."""
    import yaml

    data = yaml.safe_load(MINIMAL)
    for section, values in yaml.safe_load(textwrap.dedent(snippet)).items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section].update(values)
        else:
            data[section] = values
    return yaml.safe_dump(data, sort_keys=False)


def problems_of(path: Path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


# ------------------------------------------------------------------------------------------- shipped files


def test_shipped_configs_and_recipes_are_found():
    assert len(SHIPPED_CONFIGS) >= 5 and len(RECIPES) >= 3


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_without_warnings(path):
    loaded = load_config(path)
    assert loaded.warnings == []
    assert loaded.config.output.dir


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates_when_a_config_extends_it(tmp_path, path):
    recipe = __import__("yaml").safe_load(path.read_text())
    preference = recipe.get("train", {}).get("objective", "sft") != "sft"  # a preference recipe reads pairs
    cfg = write(tmp_path / "c.yaml", f"extends: {path}\n" + (MINIMAL.replace("format: alpaca", "format: preference")
                                                              if preference else MINIMAL))
    loaded = load_config(cfg)
    # what the recipe sets arrives in the resolved config
    for section, values in recipe.items():
        for key, value in values.items():
            got = getattr(getattr(loaded.config, section), key)
            got = got.model_dump(exclude_unset=True) if hasattr(got, "model_dump") else got
            assert got == value, f"{section}.{key}"


def test_shipped_config_header_gives_the_command_that_runs_it():
    for path in SHIPPED_CONFIGS:
        head = path.read_text().splitlines()[:4]
        assert any("lorafit " in line and path.name in line for line in head if line.startswith("#")), path


# ------------------------------------------------------------------------------------------- defaults / types


def test_minimal_config_gets_contract_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL)).config
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.targets) == (16, 32, "all-linear")
    assert cfg.model.quantization is None and cfg.model.dtype == "bfloat16"
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.scheduler) == (4, 4, "cosine")
    assert cfg.data.packing is True and cfg.data.train_on_prompt is False


def test_unknown_key_names_file_line_and_suggests_the_right_key(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL + "adapter:\n  rank: 8\n")
    (problem,) = problems_of(path)
    assert problem == f"{path}:11: adapter.rank: unknown key (did you mean adapter.r?)"


def test_key_in_the_wrong_section_suggests_its_section(tmp_path):
    (problem,) = problems_of(write(tmp_path / "c.yaml", MINIMAL + "train:\n  r: 8\n"))
    assert "train.r: unknown key (did you mean adapter.r?)" in problem


def test_near_miss_inside_a_list_item_keeps_the_index(tmp_path):
    text = MINIMAL.replace("format: alpaca", "fromat: alpaca")
    found = problems_of(write(tmp_path / "c.yaml", text))
    assert any("data.train.0.fromat: unknown key (did you mean data.train.0.format?)" in p for p in found)
    assert any("data.train.0.format: required key is missing" in p for p in found)


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("adapter:\n  r: sixteen\n", "adapter.r: input should be a valid integer"),
        ("adapter:\n  r: 0\n", "adapter.r: input should be greater than or equal to 1 (got 0)"),
        ("adapter:\n  dropout: 1.5\n", "adapter.dropout: input should be less than 1"),
        ("train:\n  lr: -0.1\n", "train.lr: input should be greater than 0"),
        ("train:\n  scheduler: cosin\n",
         "train.scheduler: must be one of 'cosine', 'linear' or 'constant' (got 'cosin'; did you mean 'cosine'?)"),
        ("adapter:\n  method: vra\n", "adapter.method: must be one of 'lora', 'dora', 'lora_fa', 'vera' or 'adalora' "
                                       "(got 'vra'; did you mean 'vera'?)"),
        ("adapter:\n  init: pisa\n", "adapter.init: must be one of 'default', 'gaussian', 'pissa', 'olora' or 'loftq' "
                                      "(got 'pisa'; did you mean 'pissa'?)"),
        ("adapter:\n  method: lora\n  vera: {d_initial: 0.2}\n", "adapter.vera: settings for method vera, but "
                                                                  "adapter.method is lora"),
        ("adapter:\n  init: loftq\n", "adapter.init: loftq prepares an adapter for a quantized base"),
        ("adapter:\n  method: adalora\n  r: 8\n  adalora: {init_r: 4}\n", "adapter.adalora.init_r: 4 is below adapter.r (8)"),
        ("model:\n  path: x\n  dtype: fp8\n", "model.dtype: must be one of 'float32', 'bfloat16' or 'float16'"),
        ("adapter:\n  targets: q_proj\n", "for one suffix write [q_proj]"),
        ("adapter:\n  targets: 're:(unclosed'\n", "adapter.targets: invalid regular expression"),
        ("train:\n  trackers: [tensorbord]\n", "train.trackers.0: must be one of 'tensorboard', 'wandb' or 'mlflow'"),
        ("model:\n  path: x\n  quantization:\n    bits: 3\n", "model.quantization.bits: must be one of 4 or 8 (got 3)"),
        ("train: 5\n", "train: must be a mapping of keys"),
    ],
)
def test_bad_value_message_names_key_and_what_is_allowed(tmp_path, snippet, expected):
    found = problems_of(write(tmp_path / "c.yaml", minimal_with(snippet)))
    assert any(expected in p for p in found), found
    assert all(p.startswith(f"{tmp_path / 'c.yaml'}:") for p in found)


def test_all_problems_are_reported_together(tmp_path):
    text = MINIMAL + "adapter:\n  rank: 8\n  dropout: 2\ntrain:\n  lr: 0\n  optimizer: sgd\n"
    found = problems_of(write(tmp_path / "c.yaml", text))
    assert len(found) == 4
    message = str(ConfigError(found, source="c.yaml"))
    assert message.startswith("4 problems in c.yaml:")


def test_missing_required_sections_are_named(tmp_path):
    found = problems_of(write(tmp_path / "c.yaml", "adapter:\n  r: 8\n"))
    assert {p.split(": ")[1] for p in found} == {"model", "data", "output"}


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  path: x\n  dtype: [bfloat16\ntrain:\n  lr: 1\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4:") and "YAML syntax error" in problem


def test_duplicate_key_is_an_error_not_a_silent_overwrite(tmp_path):
    (problem,) = problems_of(write(tmp_path / "c.yaml", MINIMAL + "train:\n  lr: 1.0e-4\n  lr: 1.0e-3\n"))
    assert "train.lr: duplicate key" in problem


def test_missing_config_file(tmp_path):
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert problem == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_top_level_list_is_refused(tmp_path):
    (problem,) = problems_of(write(tmp_path / "c.yaml", "- a\n- b\n"))
    assert "top level must be a mapping" in problem


# ------------------------------------------------------------------------------------------------ extends


def test_extends_merges_in_order_and_the_including_file_wins(tmp_path):
    write(tmp_path / "recipes/a.yaml", "adapter:\n  r: 4\n  alpha: 8\ntrain:\n  lr: 1.0e-3\n  epochs: 5\n")
    write(tmp_path / "recipes/b.yaml", "adapter:\n  r: 8\ntrain:\n  lr: 3.0e-4\n")
    child = write(tmp_path / "configs/c.yaml", "extends: [../recipes/a.yaml, ../recipes/b.yaml]\n" + MINIMAL
                  + "train:\n  epochs: 2\n")
    cfg = load_config(child).config
    assert cfg.adapter.r == 8  # b over a
    assert cfg.adapter.alpha == 8  # only a sets it: nested mappings merge key by key
    assert cfg.train.lr == 3.0e-4  # b over a
    assert cfg.train.epochs == 2  # the including file over both


def test_extends_replaces_lists_instead_of_appending(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL + "adapter:\n  targets: [q_proj, v_proj]\n")
    child = write(tmp_path / "c.yaml", "extends: base.yaml\nadapter:\n  targets: [o_proj]\n")
    assert load_config(child).config.adapter.targets == ["o_proj"]


def test_error_in_a_parent_names_the_parent_file(tmp_path):
    parent = write(tmp_path / "base.yaml", MINIMAL + "train:\n  lr: -1\n")
    child = write(tmp_path / "c.yaml", "extends: base.yaml\nadapter:\n  r: 8\n")
    (problem,) = problems_of(child)
    assert problem.startswith(f"{parent}:11: train.lr")


def test_extends_cycle_is_named(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n" + MINIMAL)
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    (problem,) = problems_of(tmp_path / "a.yaml")
    assert "extends: cycle:" in problem and "a.yaml -> " in problem and "b.yaml -> " in problem


def test_extends_missing_parent_names_the_including_file(tmp_path):
    child = write(tmp_path / "c.yaml", "extends: ../recipes/nope.yaml\n" + MINIMAL)
    (problem,) = problems_of(child)
    assert problem.startswith(f"{child}: extends: parent config '../recipes/nope.yaml' not found")


# ---------------------------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml_and_win_over_files(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    cfg = load_config(path, ["train.lr=1e-4", "adapter.r=8", "data.packing=false",
                             "adapter.targets=[q_proj, v_proj]", "train.max_steps=null"]).config
    assert cfg.train.lr == 1e-4 and cfg.adapter.r == 8 and cfg.data.packing is False
    assert cfg.adapter.targets == ["q_proj", "v_proj"] and cfg.train.max_steps is None


def test_override_replaces_or_appends_a_whole_list_item(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    cfg = load_config(path, ["data.train.1={path: b.jsonl, format: text}"]).config
    assert [s.path for s in cfg.data.train] == ["data/train.jsonl", "b.jsonl"]
    cfg = load_config(path, ["data.train.0={path: c.jsonl, format: chat}"]).config
    assert [(s.path, s.format) for s in cfg.data.train] == [("c.jsonl", "chat")]
    found = problems_of(path, ["data.train.5={path: x, format: text}"])
    assert "use index 1 to add one" in found[0]


def test_override_can_create_the_quantization_section(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL), ["model.quantization.bits=8"]).config
    assert cfg.model.quantization is not None and cfg.model.quantization.bits == 8


def test_override_addresses_list_items_by_index(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL), ["data.train.0.format=chat"]).config
    assert cfg.data.train[0].format == "chat"
    found = problems_of(tmp_path / "c.yaml", ["data.train.3.format=chat"])
    assert "index 3 does not exist" in found[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "command line: train.lrr: unknown key (did you mean train.lr?)"),
        ("adapter.rank=8", "command line: adapter.rank: unknown key (did you mean adapter.r?)"),
        ("nosuch.key=1", "command line: nosuch.key: unknown key"),
        ("train.lr", "command line: override 'train.lr' is not KEY=VALUE"),
        ("=3", "command line: override '=3' is not KEY=VALUE"),
        ("data.train.path=x", "command line: data.train.path: data.train is a list; address an item by its index"),
        ("train.lr=[1", "command line: train.lr: value '[1' is not valid YAML"),
    ],
)
def test_bad_override_is_named(tmp_path, override, expected):
    found = problems_of(write(tmp_path / "c.yaml", MINIMAL), [override])
    assert any(p.startswith(expected) for p in found), found


def test_override_value_errors_name_the_command_line(tmp_path):
    (problem,) = problems_of(write(tmp_path / "c.yaml", MINIMAL), ["train.lr=-3"])
    assert problem.startswith("command line: train.lr: input should be greater than 0")


def test_parse_override_keeps_equals_signs_in_the_value():
    assert parse_override("output.dir=runs/a=b") == ("output.dir", "runs/a=b")


# ------------------------------------------------------------------------------------------- cross-field


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ("model:\n  path: x\n  quantization:\n    bits: 8\n    type: fp4\n", "model.quantization.type: applies to 4-bit only"),
        ("train:\n  warmup: 2.5\n", "train.warmup: 2.5 is >= 1, so it counts steps and must be a whole number"),
        ("train:\n  warmup: 50\n  max_steps: 10\n", "train.warmup: 50 warmup steps exceed train.max_steps (10)"),
        ("train:\n  eval_every: 10\n", "train.eval_every: there is no eval data"),
        ("data:\n  train: [{path: a.jsonl, format: text}]\n  eval: [{path: b.jsonl, format: text}]\n"
         "  eval_fraction: 0.1\n", "use one or the other"),
        ("train:\n  precision: fp16\n", "train.precision: fp16 with model.dtype bfloat16"),
    ],
)
def test_cross_field_problems(tmp_path, snippet, expected):
    found = problems_of(write(tmp_path / "c.yaml", minimal_with(snippet)))
    assert any(expected in p for p in found), found


def test_quantization_defaults_are_fine_with_8_bits(tmp_path):
    text = minimal_with("model:\n  path: x\n  quantization:\n    bits: 8\n")
    cfg = load_config(write(tmp_path / "c.yaml", text)).config
    assert cfg.model.quantization.bits == 8


def test_child_can_switch_a_4bit_parent_to_8bit(tmp_path):
    write(tmp_path / "base.yaml", minimal_with("model:\n  path: x\n  quantization:\n    bits: 4\n    type: fp4\n"))
    child = write(tmp_path / "c.yaml", "extends: base.yaml\nmodel:\n  quantization:\n    bits: 8\n")
    cfg = load_config(child).config
    assert cfg.model.quantization.bits == 8 and "type" not in cfg.to_dict()["model"]["quantization"]


@pytest.mark.parametrize("snippet, key", [("adapter:\n  r: yes\n", "adapter.r"),
                                          ("train:\n  max_steps: true\n", "train.max_steps"),
                                          ("train:\n  warmup: no\n", "train.warmup")])
def test_yaml_booleans_are_not_taken_as_numbers(tmp_path, snippet, key):
    found = problems_of(write(tmp_path / "c.yaml", minimal_with(snippet)))
    assert any(f"{key}: must be a number, not " in p for p in found), found


def test_numbers_given_for_names_are_read_as_text(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL), ["output.dir=2024", "model.revision=1234567",
                                                             "train.lr=2e-4"]).config
    assert cfg.output.dir == "2024" and cfg.model.revision == "1234567" and cfg.train.lr == 2e-4


def test_epochs_ignored_when_max_steps_set_is_a_warning(tmp_path):
    loaded = load_config(write(tmp_path / "c.yaml", MINIMAL + "train:\n  epochs: 3\n  max_steps: 100\n"))
    assert loaded.warnings == ["train.epochs: 3 is ignored because train.max_steps (100) is set"]


def test_config_round_trips_through_its_yaml_dump(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", MINIMAL + "adapter:\n  targets: [q_proj]\n")).config
    again = load_config(write(tmp_path / "again.yaml", cfg.to_yaml())).config
    assert again == cfg


def test_8bit_config_round_trips_through_its_yaml_dump(tmp_path):
    text = minimal_with("model:\n  path: x\n  quantization:\n    bits: 8\n")
    cfg = load_config(write(tmp_path / "c.yaml", text)).config
    again = load_config(write(tmp_path / "again.yaml", cfg.to_yaml())).config
    assert again.to_dict() == cfg.to_dict() and again.model.quantization.bits == 8


def test_config_diff_names_dotted_keys():
    old = {"train": {"lr": 1, "epochs": 2}, "adapter": {"r": 8}}
    new = {"train": {"lr": 2, "epochs": 2}, "adapter": {"r": 8, "alpha": 4}}
    assert config_diff(old, new) == ["adapter.alpha", "train.lr"]


ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_launch_configs_load_in_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert str(cfg.distributed_type).rsplit(".", 1)[-1] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert str(cfg.mixed_precision).rsplit(".", 1)[-1] == "no"  # lorafit's train.precision decides
    first = path.read_text().splitlines()[:4]
    assert any("accelerate launch --config_file configs/accelerate/" + path.name in line for line in first)


def test_every_schema_key_is_documented_in_the_config_reference():
    from lorafit.config import Config, _all_dotted_keys

    doc = (ROOT / "docs" / "config.md").read_text()
    missing = [k for k in _all_dotted_keys(Config) if f"`{k}`" not in doc]
    assert missing == []
