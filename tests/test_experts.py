"""MoE experts stored as fused 3-D parameters: a low-rank update per expert, targeted by all-linear, left out by
`exclude: [experts]`, saved as PEFT saves `target_parameters` adapters (both directions, equal logits and
gradients), merged, planned, and left unquantized (and said so) by a 4-bit base."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from lorafit.adapters import attach_lora, find_targets, lora_layers, unwrap_lora
from lorafit.adapters.experts import ExpertLora, expert_delta
from lorafit.adapters.peft_io import load_adapter, save_adapter
from lorafit.errors import LorafitError

R, ALPHA, VOCAB = 2, 6.0, 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=None)
MOE = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         head_dim=16, decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2)),
    # gpt-oss stores its experts transposed, (E, in, out), with biases beside them
    "gpt_oss": ("GptOssConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"])),
}


def build(arch: str = "mixtral", seed: int = 0):
    import transformers

    name, extra = MOE[arch]
    config = getattr(transformers, name)(**{**SMALL, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # gpt-oss starts its experts at zero: give every expert weight a real value
        for n, p in model.named_parameters():
            if "experts" in n:
                p.normal_(0, 0.05)
    return model


def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1, generator=gen)


def test_expert_delta_is_one_low_rank_update_per_expert_in_peft_layout():
    experts, r, d_in, d_out = 3, 2, 5, 4
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(r * experts, d_in, generator=gen), torch.randn(d_out, r * experts, generator=gen)
    delta = expert_delta(a, b, 1.5, experts)
    assert tuple(delta.shape) == (experts, d_out, d_in)
    for e in range(experts):  # A: rows e·r .. e·r+r-1 are A_e; B: column j·E + e is column j of B_e
        a_e = a[e * r:(e + 1) * r]
        b_e = torch.stack([b[:, j * experts + e] for j in range(r)], dim=1)
        torch.testing.assert_close(delta[e], 1.5 * b_e @ a_e)
    torch.testing.assert_close(expert_delta(a, b, 1.5, experts, transposed=True), delta.transpose(1, 2))


def test_all_linear_covers_fused_expert_weights_and_exclude_or_a_name_selects():
    model = build()
    names = find_targets(model, "all-linear")
    experts = [n for n in names if ".experts." in n]
    assert experts == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
                       "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    assert not [n for n in find_targets(model, "all-linear", exclude=["experts"]) if ".experts." in n]
    assert find_targets(model, ["down_proj"]) == ["model.layers.0.mlp.experts.down_proj",
                                                  "model.layers.1.mlp.experts.down_proj"]
    assert find_targets(model, ["experts"]) == experts
    assert "model.layers.0.mlp.gate" not in names  # the router is no target: it decides, it does not compute


@pytest.mark.parametrize("arch", list(MOE))
def test_lorafit_expert_adapter_loads_in_peft_with_equal_logits(tmp_path, arch):
    from peft import PeftModel

    model = build(arch)
    attach_lora(model, "all-linear", r=R, alpha=ALPHA)
    assert sum(isinstance(m, ExpertLora) for m in lora_layers(model).values()) == 4
    randomize(model)
    with torch.no_grad():
        ours, plain = model(ids()).logits, build(arch)(ids()).logits
    assert rel(ours, plain) > 1e-3
    save_adapter(model, tmp_path / "a", base_model_name_or_path=None, r=R, alpha=ALPHA, dropout=0.05,
                 targets="all-linear")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0  # PEFT refuses dropout on parameter targets
    theirs = PeftModel.from_pretrained(build(arch), tmp_path / "a").eval()
    with torch.no_grad():
        assert rel(theirs(ids()).logits, ours) <= 1e-5


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_peft_target_parameters_adapter_loads_in_lorafit_with_equal_logits_and_gradients(tmp_path, arch):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"], init_lora_weights=False,
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"], use_rslora=True)
    peft_model = get_peft_model(build(arch), config)
    peft_model.save_pretrained(tmp_path / "peft")
    model = build(arch)
    load_adapter(model, tmp_path / "peft")
    theirs_logits, ours_logits = peft_model(ids()).logits, model(ids()).logits
    assert rel(ours_logits, theirs_logits) <= 1e-5
    theirs_logits.square().mean().backward()
    ours_logits.square().mean().backward()
    grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
             for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == grads.keys() and any(".experts.base_layer.lora_A" in n for n in ours)
    for name, grad in ours.items():
        assert rel(grad, grads[name]) <= 1e-4, name


def test_merge_folds_every_experts_update_and_unwrap_restores_the_modules():
    model = build()
    attach_lora(model, "all-linear", r=R, alpha=ALPHA)
    randomize(model)
    with torch.no_grad():
        adapted = model(ids()).logits
        layer = lora_layers(model)["model.layers.0.mlp.experts"]  # the outer layer: down_proj
        before = layer.base_weight().clone()
        layer.merge()
        torch.testing.assert_close(layer.base_weight(), before + layer.delta())
        layer.unmerge()
        torch.testing.assert_close(layer.base_weight(), before, rtol=0, atol=1e-6)
        unwrap_lora(model, merge=True)
        assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
        assert not lora_layers(model)
        assert rel(model(ids()).logits, adapted) <= 1e-5


def test_methods_that_cannot_adapt_experts_are_refused_naming_the_fix():
    with pytest.raises(LorafitError, match="adapter.exclude"):
        attach_lora(build(), "all-linear", r=R, alpha=ALPHA, dora=True)
    names = attach_lora(build(), "all-linear", ["experts"], r=R, alpha=ALPHA, dora=True)
    assert not [n for n in names if ".experts" in n]


def _config(tmp_path, model_dir, quantization="null", method="lora"):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "x", "input": "", "output": "y"}) + "\n")
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{path: {model_dir}, dtype: bfloat16, quantization: {quantization}}}
        adapter: {{method: {method}, r: {R}, alpha: {ALPHA}, targets: all-linear}}
        data: {{train: [{{path: {data}, format: alpaca}}]}}
        output: {{dir: {tmp_path / "run"}}}
    """))
    return path


def test_plan_counts_expert_targets_as_attaching_does(tmp_path):
    from lorafit.config import load_config
    from lorafit.plan import make_plan

    build().save_pretrained(tmp_path / "m")
    plan = make_plan(load_config(_config(tmp_path, tmp_path / "m")).config)
    model = build()
    attach_lora(model, "all-linear", r=R, alpha=ALPHA)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expert = sum(p.numel() for layer in lora_layers(model).values() if isinstance(layer, ExpertLora)
                 for n, p in layer.named_parameters() if n.startswith("lora_"))
    assert plan.model.adapter_params == trainable and plan.model.expert_adapter_params == expert > 0
    assert len(plan.model.expert_targets) == 4 and plan.model.experts == 4


def test_4bit_base_keeps_expert_weights_in_the_model_dtype_and_the_plan_says_so(tmp_path, capsys):
    from lorafit.cli import main
    from lorafit.config import load_config
    from lorafit.model import load_model
    from lorafit.plan import make_plan

    build().save_pretrained(tmp_path / "m")
    quant = "{bits: 4, double_quant: false}"
    cfg = load_config(_config(tmp_path, tmp_path / "m", quantization=quant)).config
    model = load_model(cfg.model, device_map="cpu")
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and type(experts.gate_up_proj) is torch.nn.Parameter
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # Measured weight bytes (4-bit codes + block scales, everything else in bf16) against the plan's estimate
    measured = sum(p.numel() * p.element_size() for p in model.parameters())
    measured += sum(m.weight.quant_state.absmax.numel() * m.weight.quant_state.absmax.element_size()
                    for m in model.modules() if type(m).__name__ == "Linear4bit")
    plan = make_plan(cfg)
    assert abs(plan.memory["weights"] - measured) <= 0.02 * measured
    expert_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if ".experts." in n)
    assert expert_bytes > 0.3 * measured  # most of a MoE: what a 4-bit "QLoRA" leaves unquantized
    with pytest.raises(SystemExit) as info:
        main(["validate", str(_config(tmp_path, tmp_path / "m", quantization=quant))])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "4-bit quantizes linear layers only" in out and "stay bfloat16" in out


def test_validate_refuses_dora_on_expert_weights_before_loading(tmp_path, capsys):
    from lorafit.cli import main

    build().save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit) as info:
        main(["validate", str(_config(tmp_path, tmp_path / "m", method="dora"))])
    assert info.value.code == 2
    assert "adapter.exclude" in capsys.readouterr().err
