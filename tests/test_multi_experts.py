"""Several adapters on one MoE base whose adapters adapt the fused expert weights (ExpertLora, nested when one
experts module has two adapted weights): taken off the model without leaving a layer behind, chosen per batch
(`bank.use`) and per row (`bank.rows`: the experts module sees flattened tokens, not rows), and through
`lorafit generate --adapter` and `lorafit eval --adapter` — each adapter answering exactly as when it is attached
alone with `checkpoint.load_adapter`."""

from __future__ import annotations

import json

import pytest
import torch
from rundirs import base_model, make_run, with_adapter

from lorafit.adapters import lora_layers
from lorafit.adapters.experts import ExpertLora
from lorafit.adapters.multi import AdapterBank, take_adapter_layers
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.evaluate import add_adapter, evaluate_command
from lorafit.generate import Sampling, decode, generate_command, prompt_ids
from lorafit.sources import resolve_source

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=None)
MOE = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
}
PROMPT = "Reverse the word: stone"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def moe(tmp_path_factory, tiny_tokenizer):
    """{arch: (model folder, {"a": run adapting every linear layer and both expert weights (nested),
    "b": run adapting q_proj and the experts' down_proj only})}, built on first use."""
    import transformers

    made = {}

    def get(arch: str):
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            name, extra = MOE[arch]
            config = getattr(transformers, name)(vocab_size=len(tiny_tokenizer), **SIZES, **extra)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "experts" in n:
                        p.normal_(0, 0.05)
            model.save_pretrained(root / "model")
            tiny_tokenizer.save_pretrained(root / "model")
            torch.manual_seed(1)
            a = make_run(root, root / "model", tiny_tokenizer, name="a")
            torch.manual_seed(2)
            b = make_run(root, root / "model", tiny_tokenizer, name="b", targets=["q_proj", "down_proj"])
            made[arch] = root / "model", {"a": a, "b": b}
        return made[arch]

    return get




def _experts(model):
    return model.model.layers[0].mlp.experts


def test_runs_adapt_expert_weights_nested_and_single(moe):
    model_dir, runs = moe("mixtral")
    a = lora_layers(with_adapter(model_dir, runs["a"]))
    b = lora_layers(with_adapter(model_dir, runs["b"]))
    assert {"model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"} <= set(a)
    assert isinstance(a["model.layers.0.mlp.experts"].base_layer, ExpertLora)  # gate_up_proj inside down_proj
    assert isinstance(b["model.layers.0.mlp.experts"], ExpertLora)
    assert "model.layers.0.mlp.experts.base_layer" not in b


def test_taking_nested_expert_layers_puts_the_bare_experts_module_back(moe):
    model_dir, runs = moe("mixtral")
    model = with_adapter(model_dir, runs["a"])
    ids = torch.arange(5, 29).view(2, 12)  # (B, T)
    layers = take_adapter_layers(model)
    assert type(_experts(model)).__name__ == "MixtralExperts" and lora_layers(model) == {}
    outer = layers["model.layers.0.mlp.experts"]  # the outermost layer stands for the module; inner ones ride in it
    assert isinstance(outer, ExpertLora) and isinstance(outer.base_layer, ExpertLora)
    assert outer.base_layer.base_layer is _experts(model)
    assert not any(name.endswith(".base_layer") for name in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_model(model_dir)(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_whole_batch_and_per_row_expert_adapters_equal_each_adapterwith_adapter(moe, arch):
    model_dir, runs = moe(arch)
    model = base_model(model_dir)
    bank = AdapterBank(model)
    for name, run in runs.items():
        add_adapter(bank, name, run / "adapter")
    ids = torch.randint(3, 300, (4, 7), generator=torch.Generator().manual_seed(3))  # (B, T)
    names = ["a", None, "b", "a"]
    with torch.no_grad():
        expected = {"a": with_adapter(model_dir, runs["a"])(input_ids=ids).logits,
                    "b": with_adapter(model_dir, runs["b"])(input_ids=ids).logits,
                    None: base_model(model_dir)(input_ids=ids).logits}
        for name in ("a", "b", None):
            with bank.use(name):
                assert torch.equal(model(input_ids=ids).logits, expected[name]), name  # each its own forward
        with bank.rows(names):
            mixed = model(input_ids=ids).logits
        with bank.detached() as bare:
            assert torch.equal(bare(input_ids=ids).logits, expected[None])
        with bank.rows(names[:1] + ["b"]):  # after detached(): the adapters are held as before
            again = model(input_ids=ids[:2]).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again[1], expected["b"][1], rtol=1e-5, atol=1e-5)
    for name in ("a", "b"):  # the adapters change the output, so the equalities above say something
        assert (expected[name] - expected[None]).abs().max() > 1e-2
    assert (expected["a"] - expected["b"]).abs().max() > 1e-2


def test_generate_with_expert_adapters_decodes_as_eachwith_adapter(moe, tiny_tokenizer, capsys):
    model_dir, runs = moe("mixtral")
    replies = generate_command(runs["a"], PROMPT, max_new_tokens=10, adapters={"bee": runs["b"]})
    assert list(replies) == ["base", "a", "bee"]
    assert replies["a"] == generate_command(runs["a"], PROMPT, max_new_tokens=10)
    assert replies["bee"] == generate_command(runs["b"], PROMPT, max_new_tokens=10)
    assert "── bee ──" in capsys.readouterr().out
    # the tokens, not only the text: the bank's mixed batch against each model with its adapter attached directly
    ids = prompt_ids(tiny_tokenizer, resolve_source(runs["a"]), PROMPT)
    greedy = Sampling(max_new_tokens=10)
    model = base_model(model_dir)
    bank = AdapterBank(model)
    for name, run in runs.items():
        add_adapter(bank, name, run / "adapter")
    with bank.rows([None, "a", "b"]):
        mixed = decode(model, tiny_tokenizer, [ids] * 3, [greedy] * 3, stop_ids=[])
    alone = [decode(m, tiny_tokenizer, [ids], [greedy], stop_ids=[])[0].token_ids
             for m in (base_model(model_dir), with_adapter(model_dir, runs["a"]), with_adapter(model_dir, runs["b"]))]
    assert [c.token_ids for c in mixed] == alone
    assert alone[1] != alone[0] and alone[2] != alone[0]


def test_eval_with_two_expert_adapters_equals_eachwith_adapter(moe, tmp_path):
    _, runs = moe("mixtral")
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as info:
        main(["eval", str(runs["a"]), "--adapter", f"a={runs['a']}", "--adapter", f"b={runs['b']}",
              "--generate", "0", "--json", str(out)])
    assert info.value.code == 0
    written = json.loads(out.read_text())
    single_a = evaluate_command(runs["a"], generate_rows=0)
    single_b = evaluate_command(runs["a"], adapter_dir=runs["b"] / "adapter", generate_rows=0)
    assert written["adapters"]["a"]["loss"] == pytest.approx(single_a["adapter"]["loss"], rel=1e-6)
    assert written["adapters"]["b"]["loss"] == pytest.approx(single_b["adapter"]["loss"], rel=1e-6)
    assert written["base"]["loss"] == pytest.approx(single_a["base"]["loss"], rel=1e-6)
    assert written["adapters"]["a"]["loss"] != pytest.approx(written["adapters"]["b"]["loss"], rel=1e-4)


def test_per_row_names_that_do_not_match_the_batch_are_refused_at_the_experts(moe):
    model_dir, runs = moe("mixtral")
    model = base_model(model_dir)
    bank = AdapterBank(model)
    for name, run in runs.items():
        add_adapter(bank, name, run / "adapter")
    ids = torch.arange(5, 19).view(2, 7)  # (B, T): 14 tokens, not a whole number per row of 3 names
    with bank.rows(["a", "b", None]), pytest.raises(LorafitError, match="14 tokens.*batch of 3"):
        model(input_ids=ids)
