"""Token rows (PEFT trainable_token_indices) and modules_to_save: the layer's math, PEFT both ways (on the base
resized to the adapter's tokenizer), added tokens, untrained special tokens found and repaired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tokenizer
from safetensors.torch import load_file

from lorafit.adapters import attach_lora, lora_layers
from lorafit.adapters.peft_io import load_adapter, save_adapter
from lorafit.adapters.tokens import TokenRows, attach_token_rows, mean_row, train_whole, untrained_rows
from lorafit.model import add_tokens, align_model_with_tokenizer

R, ALPHA = 4, 12.0
NEW = ["<|new_a|>", "<|new_b|>"]


def _ids(vocab: int, n: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (2, n), generator=torch.Generator().manual_seed(0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def grown_base(tmp_path: Path, tied: bool):
    """A saved tiny Llama and its tokenizer, plus that tokenizer with NEW added and the base resized to it."""
    tok = build_tokenizer()
    base_dir = tmp_path / f"base-{tied}"
    build_tiny_llama(len(tok), tie_word_embeddings=tied).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    grown = build_tokenizer()
    new_ids = add_tokens(grown, NEW)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    align_model_with_tokenizer(model, grown)
    return base_dir, grown, model, new_ids


def _randomize(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05, generator=gen)
        for m in model.modules():
            if isinstance(m, TokenRows) and not m.tied:
                m.delta.normal_(0, 0.3, generator=gen)


def test_new_rows_start_at_the_mean_of_the_existing_rows(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir, grown, model, new_ids = grown_base(tmp_path, tied=False)
    old = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for new, before in ((model.get_input_embeddings(), old.get_input_embeddings()),
                        (model.get_output_embeddings(), old.get_output_embeddings())):
        want = before.weight.mean(dim=0)
        assert torch.allclose(new.weight[new_ids], want.expand(len(new_ids), -1), atol=1e-7)
        assert torch.equal(new.weight[: before.weight.shape[0]], before.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_token_rows_equal_the_matrix_with_those_rows_replaced(tmp_path, tied):
    _, grown, model, new_ids = grown_base(tmp_path, tied)
    ids = [*new_ids, 7]
    attach_token_rows(model, ids)
    _randomize(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embed.token_indices == head.token_indices == sorted(ids)  # the block's rows, in id order
    ids = sorted(ids)
    w_in = embed.base_layer.weight.clone()
    w_in[ids] = embed.delta.detach()
    x = torch.cat([_ids(len(grown))[:1], torch.tensor([ids])], dim=1)  # every trained id appears
    assert torch.equal(embed(x), torch.nn.functional.embedding(x, w_in))
    h = torch.randn(2, 5, w_in.shape[1])
    w_out = (head.base_layer.weight.clone() if not tied else w_in.clone())
    w_out[ids] = head.delta.detach()
    assert torch.allclose(head(h), h @ w_out.T, atol=1e-6)
    assert head.tied == tied


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_with_token_rows_loads_in_peft_on_the_resized_base(tmp_path, tied):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, grown, model, new_ids = grown_base(tmp_path, tied)
    attach_lora(model, ["q_proj", "v_proj"], r=R, alpha=ALPHA)
    attach_token_rows(model, new_ids)
    _randomize(model)
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir), r=R, alpha=ALPHA,
                       dropout=0.0, targets=["q_proj", "v_proj"], tokenizer=grown)
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    rows = [k for k in tensors if "trainable_tokens_delta" in k]
    assert len(rows) == (1 if tied else 2)  # a tied pair is saved once
    assert sorted(config["trainable_token_indices"]) == (["model.embed_tokens"] if tied else
                                                          ["lm_head", "model.embed_tokens"])
    x = _ids(len(grown))
    with torch.no_grad():
        ours = model(x).logits
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reference.resize_token_embeddings(len(grown))
    peft = PeftModel.from_pretrained(reference, str(out)).eval()
    with torch.no_grad():
        assert _rel(ours, peft(x).logits) <= 1e-5
    # and back: lorafit loads it on the bare base (resizing it to the adapter's tokenizer itself)
    again = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    load_adapter(again, out, dropout=0.0)
    with torch.no_grad():
        assert _rel(again(x).logits, ours) <= 1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_modules_to_save_round_trip_through_peft_both_ways(tmp_path, tied):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir, grown, _, _ = grown_base(tmp_path, tied)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    attach_lora(model, ["q_proj"], r=R, alpha=ALPHA)
    names = train_whole(model, ["lm_head"])
    _randomize(model)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.1)
    assert tied is False or model.lm_head.weight is not model.get_input_embeddings().weight
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir), r=R, alpha=ALPHA,
                       dropout=0.0, targets=["q_proj"], modules_to_save=names)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    x = _ids(384)
    with torch.no_grad():
        ours = model(x).logits
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     str(out)).eval()
    with torch.no_grad():
        assert _rel(ours, peft(x).logits) <= 1e-5
    # PEFT -> lorafit
    made = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                          LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["v_proj"], modules_to_save=["lm_head"]))
    _assert_peft_made_loads_and_merges(made, tmp_path, base_dir, x, 0.05)


def _assert_peft_made_loads_and_merges(made, tmp_path: Path, base_dir: Path, x: torch.Tensor, scale: float,
                                       tokenizer=None) -> None:
    """Move a PEFT-made adapter's trainable weights off their init, save it (with `tokenizer`, when the vocabulary
    grew), and check that lorafit's load on a fresh base and `lorafit merge` both give PEFT's logits."""
    from rundirs import run_cli
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        for p in made.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
        want = made.eval()(x).logits
    made.save_pretrained(tmp_path / "peft-made")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_path / "peft-made")
    mine = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    load_adapter(mine, tmp_path / "peft-made", dropout=0.0)
    with torch.no_grad():
        assert _rel(mine(x).logits, want) <= 1e-5
    assert run_cli("merge", str(tmp_path / "peft-made"), "--out", str(tmp_path / "merged"), "--dtype", "float32") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(merged(x).logits, want) <= 1e-5


def test_peft_made_trainable_tokens_load_in_lorafit(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir, grown, model, new_ids = grown_base(tmp_path, tied=False)
    made = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"],
                                            trainable_token_indices={"embed_tokens": new_ids, "lm_head": new_ids}))
    _assert_peft_made_loads_and_merges(made, tmp_path, base_dir, _ids(len(grown)), 0.2, tokenizer=grown)
    # eval --adapter reads it too: its loss is PEFT's on the eval rows, tokenized with the adapter's (grown) tokenizer
    from rundirs import run_cli, write_jsonl

    from lorafit.config import load_config
    from lorafit.data import build_datasets, collate
    from lorafit.loss import chunked_causal_lm_loss

    data = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": f"say {NEW[i % 2]} twice",
                                                  "output": f"{NEW[i % 2]} {NEW[i % 2]} done"} for i in range(6)])
    config = tmp_path / "eval.yaml"
    config.write_text(f"model:\n  path: {base_dir}\n  dtype: float32\ndata:\n  train:\n    - path: {data}\n"
                      f"      format: alpaca\n  eval:\n    - path: {data}\n      format: alpaca\n"
                      f"output:\n  dir: {tmp_path / 'unused'}\n")
    out = tmp_path / "eval.json"
    assert run_cli("eval", str(config), "--adapter", str(tmp_path / "peft-made"), "--generate", "0",
                   "--json", str(out)) == 0
    measured = json.loads(out.read_text())["adapter"]
    _, rows, _ = build_datasets(load_config(config).config.data, grown, seed=0, cache_dir=tmp_path / "cache")
    assert any(new_ids[0] in rows[i].input_ids for i in range(len(rows)))  # the new tokens are read as new ids
    with torch.no_grad():
        batch = collate([rows[i] for i in range(len(rows))], pad_id=grown.pad_token_id)
        labels = batch.pop("labels")
        total, tokens = chunked_causal_lm_loss(made.eval(), batch, labels)
    assert measured["tokens"] == tokens
    assert measured["loss"] == pytest.approx(float(total) / tokens, rel=1e-5)


def test_untrained_rows_are_those_far_below_the_median_norm():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=gen)
    weight[3] = 0
    weight[7] *= 1e-3  # Llama-3's reserved rows: about a thousandth of a trained row
    weight[9] *= 0.3  # a rare but trained token
    assert untrained_rows(weight, list(range(50))) == [3, 7]
    assert torch.allclose(mean_row(weight, [3, 7]), weight[[i for i in range(50) if i not in (3, 7)]].mean(0))


# ------------------------------------------------------------------------------------------- end to end

WORDS = ["stone", "river", "cloud", "apple", "green", "house", "light", "water"]
TURN_TEMPLATE = (  # a ChatML-like template on markers the base tokenizer does not have
    "{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
)


def chat_task(path: Path, n: int = 32) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {WORDS[i % len(WORDS)]}"},
                          {"role": "assistant", "content": f"{WORDS[i % len(WORDS)]} {WORDS[i % len(WORDS)]}"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def llama3_like_dir(tmp_path_factory) -> Path:
    """A base whose chat template ends turns with a special token the base never trained: the rows of
    <|im_start|> and <|im_end|> are zero in the embedding and the (untied) head, as Llama-3 bases ship
    <|eot_id|>."""
    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("llama3-like")
    model = build_tiny_llama(len(tok), initializer_range=0.3)
    with torch.no_grad():
        for i in tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]):
            model.get_input_embeddings().weight[i] = 0
            model.get_output_embeddings().weight[i] = 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def token_config(tmp_path: Path, model_dir: Path, name: str = "run", **adapter) -> Path:
    import yaml

    cfg = {"model": {"path": str(model_dir), "dtype": "float32"},
           "adapter": {"r": R, "alpha": ALPHA, "dropout": 0.0, **adapter},
           "data": {"train": [{"path": str(chat_task(tmp_path / "chat.jsonl")), "format": "chat"}],
                    "max_length": 64, "packing": False},
           "train": {"precision": "fp32", "seed": 3, "max_steps": 40, "lr": 2e-2, "warmup": 0, "batch_size": 8,
                     "grad_accum": 1, "gradient_checkpointing": False, "log_every": 10},
           "output": {"dir": str(tmp_path / name)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _override(config: Path, **sections) -> Path:
    import yaml

    cfg = yaml.safe_load(config.read_text())
    for dotted, value in sections.items():
        section, _, key = dotted.partition("__")
        cfg[section][key] = value
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


def _greedy(run: Path, prompt: str):
    from lorafit.generate import Sampling, decode, prompt_ids
    from lorafit.sources import load_inference_model, load_source_tokenizer, resolve_source, stop_token_ids

    src = resolve_source(run)
    tokenizer = load_source_tokenizer(src)
    model = load_inference_model(src)
    [done] = decode(model, tokenizer, [prompt_ids(tokenizer, src, prompt)], [Sampling(max_new_tokens=12)],
                    stop_token_ids(tokenizer, src))
    return done, tokenizer


def test_untrained_end_of_turn_is_refused_with_train_tokens_none(tmp_path, llama3_like_dir, capsys):
    from rundirs import run_cli

    config = token_config(tmp_path, llama3_like_dir, train_tokens="none")
    capsys.readouterr()
    assert run_cli("train", str(config)) == 2
    err = capsys.readouterr().err
    assert "<|im_end|>" in err and "<|im_start|>" in err and "train_tokens: auto" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_untrained_end_of_turn_is_repaired_and_the_model_stops_with_it(tmp_path, llama3_like_dir, capsys):
    from rundirs import run_cli

    assert run_cli("train", str(token_config(tmp_path, llama3_like_dir))) == 0
    header = capsys.readouterr().out
    assert "token rows trained: untrained in the base <|im_start|>, <|im_end|>" in header
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    end = build_tokenizer().convert_tokens_to_ids("<|im_end|>")
    assert end in config["trainable_token_indices"]["model.embed_tokens"]
    assert end in json.loads((adapter / "generation_config.json").read_text())["eos_token_id"]
    done, _ = _greedy(tmp_path / "run", "Repeat: river")
    assert done.finish_reason == "stop" and done.text.strip() == "river river"


@pytest.mark.slow
def test_chatml_markers_added_to_a_base_train_stop_and_match_peft_after_merge(tmp_path, learnable_model_dir):
    from peft import PeftModel
    from rundirs import run_cli
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = token_config(tmp_path, learnable_model_dir)
    _override(config, model__add_tokens=["<|turn|>", "<|end|>"], data__chat_template=TURN_TEMPLATE,
              data__eval_fraction=0.125)
    assert run_cli("train", str(config)) == 0
    adapter = tmp_path / "run" / "adapter"
    # eval: the base (its own, mean rows for the new tokens) and the adapter on the grown vocabulary
    assert run_cli("eval", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json")) == 0
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["adapter"]["loss"] < scores["base"]["loss"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert len(tokenizer) == 386 and end in tokenizer.all_special_ids
    done, _ = _greedy(tmp_path / "run", "Repeat: stone")
    assert done.finish_reason == "stop" and done.text.strip() == "stone stone"
    # merge writes the resized model; PEFT on the base resized to the adapter's tokenizer gives its logits
    assert run_cli("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--dtype", "float32") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(learnable_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer))
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    x = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Repeat: stone"}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=False)])
    with torch.no_grad():
        assert _rel(merged(x).logits, peft(x).logits) <= 1e-5


@pytest.mark.parametrize("adapter,model,needle", [
    ({"train_tokens": ["<|im_edn|>"]}, {}, "did you mean <|im_end|>?"),
    ({"modules_to_save": ["lm_haed"]}, {}, "lm_head"),
    ({}, {"add_tokens": ["<|x|>", "<|x|>"]}, "<|x|> listed more than once"),
])
def test_bad_token_settings_are_one_message_and_exit_2(tmp_path, tiny_model_dir, capsys, adapter, model, needle):
    from rundirs import run_cli

    config = token_config(tmp_path, tiny_model_dir, **adapter)
    _override(config, **{f"model__{k}": v for k, v in model.items()})
    capsys.readouterr()
    assert run_cli("train", str(config)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_add_tokens_refuses_an_ordinary_token_and_keeps_an_existing_special_one():
    from lorafit.errors import ConfigError

    tok = build_tokenizer()
    ordinary = tok.convert_ids_to_tokens(200)
    with pytest.raises(ConfigError, match="already an ordinary token"):
        add_tokens(tok, [ordinary])
    assert add_tokens(tok, ["<|im_end|>"]) == [tok.convert_tokens_to_ids("<|im_end|>")] and len(tok) == 384


def test_an_adapter_with_token_rows_is_not_held_beside_others(tmp_path, capsys):
    from rundirs import make_run, run_cli

    base_dir, grown, model, new_ids = grown_base(tmp_path, tied=False)
    attach_lora(model, ["q_proj"], r=R, alpha=ALPHA)
    attach_token_rows(model, new_ids)
    save_adapter(model, tmp_path / "rows", base_model_name_or_path=str(base_dir), r=R, alpha=ALPHA, dropout=0.0,
                 targets=["q_proj"], tokenizer=grown)
    other = make_run(tmp_path, base_dir, build_tokenizer(), name="other")
    capsys.readouterr()
    assert run_cli("generate", str(tmp_path / "rows"), "--prompt", "hi", "--adapter", f"other={other}") == 2
    err = capsys.readouterr().err
    assert "token rows" in err and "merge" in err and "Traceback" not in err
    assert run_cli("generate", str(tmp_path / "rows"), "--prompt", "hi", "--max-new-tokens", "2") == 0


@pytest.mark.parametrize("override,key", [("model.add_tokens=[<|x|>]", "model.add_tokens"),
                                          ("adapter.modules_to_save=[lm_head]", "adapter.modules_to_save")])
def test_fsdp_refuses_token_rows_and_whole_modules_before_loading(tmp_path, tiny_model_dir, override, key):
    from lorafit.config import load_config
    from lorafit.errors import LorafitError
    from lorafit.parallel import check_config_fits

    cfg = load_config(token_config(tmp_path, tiny_model_dir), [override]).config
    with pytest.raises(LorafitError, match=rf"FSDP: {key}"):
        check_config_fits(cfg)


def test_an_explicit_train_tokens_list_trains_exactly_those_rows(tmp_path, llama3_like_dir):
    from lorafit.config import load_config
    from lorafit.model import load_model, load_tokenizer
    from lorafit.vocab import plan_token_rows

    tok = build_tokenizer()
    cfg = load_config(token_config(tmp_path, llama3_like_dir), ["adapter.train_tokens=[</s>]"]).config
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer=tokenizer)
    ends = {tok.convert_tokens_to_ids("<|im_end|>")}  # untrained, but not listed: left alone
    assert plan_token_rows(cfg, model, tokenizer, [], ends).ids == [tok.eos_token_id]
    auto = load_config(token_config(tmp_path, llama3_like_dir)).config
    assert plan_token_rows(auto, model, tokenizer, [], ends).ids == sorted(ends)
