"""The model zoo: tiny random models of popular architectures, built from the installed transformers' own config
classes, each trained a few steps through `lorafit train`, merged (`lorafit merge`), and exchanged with PEFT.

For every architecture:
- the run finishes and saves a PEFT-format adapter;
- PEFT loads that adapter onto the same base with the same logits as lorafit's own load (≤ 1e-5 relative, fp32);
- the merged model, reloaded from disk as users load it, gives the adapter's logits (≤ 1e-5 relative);
- and QLoRA (4-bit nf4) trains (and, for Conv1D and MoE models, merges): bitsandbytes' CPU kernels take all
  these shapes.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from rundirs import run_cli

from lorafit.merge import max_relative_difference

VOCAB_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
# hidden 64, 2 layers, 4 heads (2 kv heads where the architecture has GQA): tiny but every code path of the block
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)

ZOO = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "opt": ("OPTConfig", dict(SIZES, ffn_dim=128, word_embed_proj_dim=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(SIZES, intermediate_size=128)),
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "phi3": ("Phi3Config", dict(SIZES, intermediate_size=128, num_key_value_heads=2)),
    "llama": ("LlamaConfig", dict(SIZES, intermediate_size=128, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(SIZES, intermediate_size=128, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(SIZES, intermediate_size=128, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(SIZES, intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(SIZES, intermediate_size=128, num_key_value_heads=2, head_dim=16)),
    "mixtral": ("MixtralConfig", dict(SIZES, intermediate_size=128, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(SIZES, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                         num_experts_per_tok=2, num_key_value_heads=2, head_dim=16,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
}
MOE = {"mixtral", "qwen3_moe"}
ROWS = [{"instruction": "Repeat the word twice.", "input": w, "output": f"{w} {w}"}
        for w in ("stone", "river", "cloud", "apple", "green", "house")]


def build_zoo_model(arch: str, vocab: int, seed: int = 0):
    """A tiny fp32 model of `arch` with random weights from `seed`."""
    import transformers

    name, sizes = ZOO[arch]
    config = getattr(transformers, name)(vocab_size=vocab, **VOCAB_IDS, **sizes)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases start at zero in some inits: nonzero ones check they survive the merge too
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory, tiny_tokenizer):
    """{arch: saved model folder (model + tokenizer)}, built on first use."""
    root = tmp_path_factory.mktemp("zoo")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            path = root / arch
            build_zoo_model(arch, len(tiny_tokenizer)).save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return get


def write_config(tmp_path: Path, model_dir: Path, name: str, quantization: str = "null", steps: int = 2) -> Path:
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        model:
          path: {model_dir}
          dtype: float32
          quantization: {quantization}
        adapter:
          r: 4
          alpha: 12
          dropout: 0.0
          targets: all-linear
        data:
          train:
            - path: {data}
              format: alpaca
          max_length: 256
          packing: false
        train:
          batch_size: 2
          grad_accum: 1
          lr: 5.0e-2
          max_steps: {steps}
          warmup: 0
          precision: fp32
          gradient_checkpointing: false
          log_every: 1
          seed: 5
        output:
          dir: {tmp_path / name}
    """))
    return path



def sample_ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def adapter_logits(arch: str, model_dir: Path, adapter: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lorafit's logits, PEFT's logits) of the base with the saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.adapters.peft_io import load_adapter

    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_adapter(ours, adapter, dropout=0.0)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                       adapter).eval()
    return ours(ids).logits, theirs(ids).logits


@pytest.mark.parametrize("arch", list(ZOO))
def test_architecture_trains_merges_and_round_trips_with_peft(arch, tmp_path, zoo_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model_dir = zoo_dir(arch)
    assert run_cli("train", str(write_config(tmp_path, model_dir, "run"))) == 0
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (arch == "gpt2")  # GPT-2's Conv1D layers
    assert bool(config.get("target_parameters")) is (arch in MOE)  # fused expert weights
    ids = sample_ids(len(tiny_tokenizer))
    ours, theirs = adapter_logits(arch, model_dir, adapter, ids)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    assert max_relative_difference([ours], [base_logits]) > 1e-3  # the trained adapter changes the model
    assert max_relative_difference([theirs], [ours]) <= 1e-5

    assert run_cli("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert max_relative_difference([merged(ids).logits], [ours]) <= 1e-5


# Every architecture's shapes pass bitsandbytes' CPU 4-bit kernels (hidden 64; k/v projections of 32 rows too).
# Merging a 4-bit run is checked where it differs: Conv1D weights (quantized transposed) and MoE experts (unquantized).
QLORA_MERGE = {"gpt2", "mixtral", "qwen3_moe"}


@pytest.mark.parametrize("arch", list(ZOO))
def test_architecture_trains_with_a_4bit_base(arch, tmp_path, zoo_dir, capsys):
    model_dir = zoo_dir(arch)
    quant = "{bits: 4, type: nf4, double_quant: false, compute_dtype: float32}"
    assert run_cli("train", str(write_config(tmp_path, model_dir, "qrun", quantization=quant, steps=1))) == 0
    header = capsys.readouterr().out
    assert ("4-bit quantizes linear layers only" in header) is (arch in MOE)  # experts stay float32: said so
    if arch in QLORA_MERGE:
        assert run_cli("merge", str(tmp_path / "qrun"), "--out", str(tmp_path / "qmerged")) == 0
