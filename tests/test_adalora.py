"""AdaLoRA: the SVD-form layer against its formula, the rank allocator against PEFT's, training that prunes to the
budget, merge, PEFT round trips both ways, and a resume that stays bit-exact in the middle of the schedule."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama
from safetensors.torch import load_file

from lorafit.adapters import attach_adapter, lora_layers, method_param_count, param_groups, param_report
from lorafit.adapters.adalora import AdaLoraLinear, Schedule, budget_at, schedule_steps
from lorafit.adapters.peft_io import load_adapter, save_adapter
from lorafit.cli import main
from lorafit.errors import LorafitError

INIT_R, R, ALPHA = 4, 2, 6.0  # alpha != init_r, so a scale that forgot ranknum would show
ADA = {"init_r": INIT_R, "tinit": 0.1, "tfinal": 0.2, "delta_t": 0.1, "beta1": 0.85, "beta2": 0.85,
       "orth_reg_weight": 0.5}
WORDS = ["stone", "river", "cloud", "apple", "green", "house", "light", "water"]


def _settings(**ada) -> dict:
    return {"method": "adalora", "r": R, "alpha": ALPHA, "dropout": 0.0, "targets": ["q_proj", "v_proj"],
            "adalora": {**ADA, **ada}}


def _randomize(model, seed: int = 5) -> None:
    """Nonzero singular values, as after some training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_E.normal_(0, 0.5, generator=gen)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------ the layer


def test_forward_and_delta_follow_the_svd_formula_with_the_init_rank_as_divisor():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    layer = AdaLoraLinear(base, r=3, alpha=ALPHA, ranknum=5)  # a cut layer keeps init_r = 5 as its divisor
    x = torch.randn(2, 4, 16)
    assert torch.equal(layer(x), base(x))  # E starts at zero: a fresh adapter changes nothing
    with torch.no_grad():
        layer.lora_E.normal_()
    a, e, b = layer.lora_A.weight, layer.lora_E, layer.lora_B.weight
    by_hand = x @ base.weight.T + base.bias + (x @ (a * e).T @ b.T) * ALPHA / (5 + 1e-5)
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.delta(), b @ torch.diag(e.view(-1)) @ a * ALPHA / (5 + 1e-5))
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)


def test_param_count_and_lora_plus_groups():
    model = build_tiny_llama(96)
    attach_adapter(model, ["q_proj", "v_proj"], method="adalora", r=INIT_R, alpha=ALPHA)
    expected = sum(method_param_count(m.in_features, m.out_features, _settings()) for m in lora_layers(model).values())
    assert param_report(model).trainable == expected == 4 * INIT_R * (64 + 1) + 2 * INIT_R * 64 + 2 * INIT_R * 32
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1, lora_plus_ratio=16)}
    assert groups["lora_B"]["lr"] == 16e-3 and len(groups["lora_B"]["params"]) == 4  # LoRA+ speeds up B (P)
    assert len(groups["lora_A"]["params"]) == 4 and len(groups["other"]["params"]) == 4  # E trains at lr


def test_schedule_fractions_become_steps():
    assert schedule_steps(ADA, 20) == Schedule(20, 2, 4, 2)
    assert schedule_steps(ADA, 30_000) == Schedule(30_000, 3000, 6000, 3000)
    assert schedule_steps({**ADA, "delta_t": 0.01}, 30) == Schedule(30, 3, 6, 1)  # at least one step
    tiny = schedule_steps({**ADA, "tinit": 0.5, "tfinal": 0.49}, 2)
    assert tiny.tinit < tiny.total - tiny.tfinal  # always a step where the final ranks are set
    sched = Schedule(20, 2, 4, 2)
    budgets = [budget_at(s, sched, 40, 16) for s in range(1, 21)]
    assert budgets[:2] == [(40, False), (40, False)] and budgets[16:] == [(16, True)] * 4
    assert budgets[2] == (int(24 * (1 - 1 / 14) ** 3 + 16), False) and budgets[3][1]  # pruned every 2nd step


# ------------------------------------------------------------------------------------------ the allocator


def _twin_models(vocab: int, total: int):
    """A PEFT AdaLoRA model and a lorafit one with the same weights (q_proj, v_proj of the tiny Llama)."""
    from peft import AdaLoraConfig, get_peft_model

    sched = schedule_steps(ADA, total)
    config = AdaLoraConfig(init_r=INIT_R, target_r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                           total_step=total, tinit=sched.tinit, tfinal=sched.tfinal, deltaT=sched.delta_t,
                           lora_dropout=0.0, orth_reg_weight=ADA["orth_reg_weight"])
    theirs = get_peft_model(build_tiny_llama(vocab), config)
    ours = build_tiny_llama(vocab)
    attach_adapter(ours, ["q_proj", "v_proj"], method="adalora", r=INIT_R, alpha=ALPHA)
    hooks = AdaLoraLinear.training_hooks(lora_layers(ours), _settings(), total)
    pairs = []
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for kind, p in layer.factors().items():
            q = getattr(peft_layer, kind)["default"]
            with torch.no_grad():
                p.copy_(q)
            pairs.append((p, q))
    return theirs, ours, hooks, pairs


def test_allocator_prunes_like_peft_on_the_same_gradients(vocab):
    total = 20
    theirs, ours, hooks, pairs = _twin_models(vocab, total)
    gen = torch.Generator().manual_seed(0)
    ids = _ids(vocab)
    with torch.no_grad():
        plain = theirs.base_model.model(input_ids=ids, labels=ids).loss
        with_reg = theirs.base_model(input_ids=ids, labels=ids).loss  # AdaLoraModel adds its orthogonality term
    torch.testing.assert_close(hooks.regularizer(), with_reg - plain, rtol=1e-5, atol=1e-6)
    budgets = []
    for step in range(1, total + 1):
        with torch.no_grad():
            for p, q in pairs:  # the same gradient and the same SGD step in both
                g = torch.randn(p.shape, generator=gen) * 0.1
                p.grad, q.grad = g.clone(), g.clone()
                p.sub_(0.05 * g)
                q.sub_(0.05 * g)
        theirs.base_model.update_and_allocate(step)
        hooks.after_step(step)
        budgets.append(hooks.budget)
        assert hooks.budget == theirs.base_model.rankallocator.budget_schedule(step)[0]
        for p, q in pairs:
            assert torch.equal(p, q), step  # E masked identically, the vectors untouched by both
    pattern = theirs.peft_config["default"].rank_pattern
    kept = {f"{n}.lora_E.default": layer.kept.tolist() for n, layer in lora_layers(ours).items()}
    assert kept == pattern
    assert sum(map(sum, pattern.values())) == R * 4 and budgets[0] == INIT_R * 4 > budgets[5] > budgets[-1] == R * 4


def test_allocator_state_round_trip_continues_identically(vocab):
    """What a checkpoint holds is enough: a new allocator loaded from it prunes as the old one goes on to."""
    _, ours, hooks, pairs = _twin_models(vocab, 20)
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=gen) for p, _ in pairs] for _ in range(8)]

    def run(h, steps):
        for step in steps:
            for (p, _), g in zip(pairs, grads[step - 1]):
                p.grad = g.clone()
            h.after_step(step)

    run(hooks, range(1, 5))
    saved = hooks.state_dict()
    e_saved = [p.detach().clone() for p, _ in pairs]
    run(hooks, range(5, 9))
    straight = [layer.kept.clone() for layer in lora_layers(ours).values()]
    with torch.no_grad():
        for (p, _), e in zip(pairs, e_saved):
            p.copy_(e)
    fresh = AdaLoraLinear.training_hooks(lora_layers(ours), _settings(), 20)
    fresh.load_state_dict(saved)
    run(fresh, range(5, 9))
    assert all(torch.equal(a, layer.kept) for a, layer in zip(straight, lora_layers(ours).values()))


# ------------------------------------------------------------------------------------------ PEFT round trips


def test_pruned_adapter_saves_in_peft_format_with_the_trained_logits(tmp_path, vocab):
    from peft import PeftModel

    _, ours, hooks, pairs = _twin_models(vocab, 10)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 11):
        for p, _ in pairs:
            p.grad = torch.randn(p.shape, generator=gen)
            with torch.no_grad():
                p.sub_(0.05 * p.grad)
        hooks.after_step(step)
    ours.eval()
    ids = _ids(vocab)
    with torch.no_grad():
        trained = ours(ids).logits
    save_adapter(ours, tmp_path / "ada", base_model_name_or_path=None, r=R, alpha=ALPHA, dropout=0.0,
                 targets=["q_proj", "v_proj"], settings=_settings())
    config = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == INIT_R and config["target_r"] == R
    assert (config["tinit"], config["tfinal"], config["deltaT"], config["total_step"]) == (1, 2, 1, 10)
    assert sum(map(sum, config["rank_pattern"].values())) == R * 4
    tensors = load_file(tmp_path / "ada" / "adapter_model.safetensors")
    for key, pattern in config["rank_pattern"].items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(pattern), 1)  # cut to the kept triplets
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(build_tiny_llama(vocab), tmp_path / "ada").eval()(ids).logits
        reloaded = build_tiny_llama(vocab)
        load_adapter(reloaded, tmp_path / "ada")
        again = reloaded(ids).logits
    assert _rel(theirs, trained) <= 1e-5 and _rel(again, trained) <= 1e-5


def test_peft_trained_adapter_loads_in_lorafit_and_merges(tmp_path, vocab, tiny_model_dir, tiny_tokenizer):
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = AdaLoraConfig(init_r=INIT_R, target_r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"],
                           total_step=10, tinit=1, tfinal=2, deltaT=1, lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = _ids(vocab)
    for step in range(1, 11):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "peft")
    model.eval()
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
        ours = build_tiny_llama(vocab)
        settings = load_adapter(ours, tmp_path / "peft")
        mine = ours(ids).logits
    assert settings.r == R and len(settings.wrapped) == 6
    assert _rel(mine, theirs) <= 1e-5
    (tmp_path / "peft" / "lorafit.yaml").unlink(missing_ok=True)
    tiny_tokenizer.save_pretrained(tmp_path / "peft")
    with pytest.raises(SystemExit) as info:
        main(["merge", str(tmp_path / "peft"), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert info.value.code == 0  # merge checks the merged logits against the adapter's itself
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(merged(ids).logits, theirs) <= 1e-5


# ------------------------------------------------------------------------------------------ through the CLI


def _config(tmp_path: Path, model_dir: Path, name: str, steps: int = 10, **train) -> Path:
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"})
                            + "\n" for w in WORDS * 4))
    train_keys = {"batch_size": 4, "grad_accum": 1, "lr": 2e-2, "max_steps": steps, "warmup": 0, "precision": "fp32",
                  "gradient_checkpointing": False, "log_every": 1, "seed": 7, **train}
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{path: {model_dir}, dtype: float32}}
        adapter:
          method: adalora
          r: {R}
          alpha: {ALPHA}
          dropout: 0.1
          adalora: {{init_r: {INIT_R}, tinit: 0.1, tfinal: 0.2, delta_t: 0.01}}
        data:
          train: [{{path: {data}, format: alpaca}}]
          max_length: 256
          packing: false
        output: {{dir: {tmp_path / name}}}
    """) + "train:\n" + "".join(f"  {k}: {v}\n" for k, v in {**train_keys, **train}.items()))
    return path


def _train(config: Path, *args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(["train", str(config), *args])
    return info.value.code


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, learnable_model_dir) -> Path:
    """One 10-step run through the CLI: pruning at steps 2..7, final ranks at 8, checkpoints at steps 3, 6, 9."""
    tmp = tmp_path_factory.mktemp("adalora-run")
    assert _train(_config(tmp, learnable_model_dir, "run", save_every=3, keep_checkpoints=5)) == 0
    return tmp / "run"


def test_training_prunes_to_the_budget_and_merges(trained_run, tmp_path):
    adapter = trained_run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    layers = len(config["rank_pattern"])
    assert layers == 14 and config["total_step"] == 10 and (config["tinit"], config["tfinal"]) == (1, 2)
    kept = [sum(p) for p in config["rank_pattern"].values()]
    assert sum(kept) == R * layers and max(kept) > R  # the budget, not spread evenly
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert sum(t.shape[0] for k, t in tensors.items() if k.endswith("lora_E")) == R * layers
    with pytest.raises(SystemExit) as info:
        main(["merge", str(trained_run), "--out", str(tmp_path / "merged")])
    assert info.value.code == 0  # merge verifies the merged model's logits against the adapter's


def test_resume_in_the_middle_of_the_schedule_is_bit_exact(trained_run, tmp_path):
    run = tmp_path / "resumed"  # the run as it was when killed after its step-3 checkpoint
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "adapter")
    for later in ("step-000006", "step-000009"):
        shutil.rmtree(run / "checkpoints" / later)
    config = run.parent / "resumed.yaml"
    config.write_text((trained_run.parent / "run.yaml").read_text().replace(str(trained_run), str(run)))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(trained_run), str(run)))
    ckpt = run / "checkpoints" / "step-000003"  # pruned at steps 2..7: the scores' EMAs decide steps 4..7
    assert "method_state.pt" in json.loads((ckpt / "state.json").read_text())["files"]
    assert _train(config, "--resume") == 0
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (trained_run, run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    patterns = [json.loads((d / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
                for d in (trained_run, run)]
    assert patterns[0] == patterns[1]


@pytest.mark.parametrize("quantization", [dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
                                          dict(load_in_8bit=True)])
def test_quantized_base_trains_and_prunes(tiny_model_dir, vocab, quantization):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BitsAndBytesConfig(**quantization),
                                                 device_map="cpu", dtype=torch.float32)
    attach_adapter(model, "all-linear", method="adalora", r=INIT_R, alpha=ALPHA)
    hooks = AdaLoraLinear.training_hooks(lora_layers(model), _settings(tinit=0.25), 4)  # prune at 2, 3; final 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(vocab)
    for step in range(1, 5):
        (model(ids, labels=ids).loss + hooks.regularizer()).backward()
        optimizer.step()
        hooks.after_step(step)
        optimizer.zero_grad()
    layers = lora_layers(model).values()
    assert all(type(m.base_layer).__name__ in ("Linear4bit", "Linear8bitLt") for m in layers)
    assert sum(int(m.kept.sum()) for m in layers) == R * len(layers)
    assert all(m.lora_E[~m.kept].abs().sum() == 0 for m in layers) and any(m.lora_E.abs().sum() > 0 for m in layers)


@pytest.mark.slow
def test_two_processes_prune_like_one(tmp_path, learnable_model_dir):
    from test_distributed import torchrun

    one = _config(tmp_path, learnable_model_dir, "one", steps=6)
    two = _config(tmp_path, learnable_model_dir, "two", steps=6, batch_size=2)
    for cfg in (one, two):
        cfg.write_text(cfg.read_text().replace("dropout: 0.1", "dropout: 0.0"))
    assert _train(one) == 0
    torchrun(two)
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    patterns = [json.loads((tmp_path / d / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
                for d in ("one", "two")]
    assert patterns[0] == patterns[1] and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("override, key", [("adapter.rslora=true", "adapter.rslora"),
                                           ("adapter.init=gaussian", "adapter.init"),
                                           ("adapter.adalora.init_r=1", "adapter.adalora.init_r")])
def test_combinations_adalora_cannot_do_are_refused_before_loading(tmp_path, learnable_model_dir, capsys, override,
                                                                    key):
    assert _train(_config(tmp_path, learnable_model_dir, "run"), override) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_fsdp_refuses_adalora():
    from lorafit import parallel

    with pytest.raises(LorafitError, match="adapter.method: adalora is not supported under FSDP"):
        parallel.check_sharding_fits(quant_bits=None, dora=False, precision="bf16", optimizer="adamw",
                                     method="adalora")


@pytest.fixture
def vocab(tiny_tokenizer) -> int:
    return len(tiny_tokenizer)
