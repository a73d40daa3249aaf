"""Shared fixtures: a tiny Llama and a tokenizer trained in-process, so every test runs offline in seconds.

Sizes are multiples of 64 so bitsandbytes' 4-bit CPU kernel accepts the layers.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "LORAFIT_CACHE" not in os.environ:  # tokenized-data cache: never the user's ~/.cache from tests
    import tempfile

    os.environ["LORAFIT_CACHE"] = tempfile.mkdtemp(prefix="lorafit-test-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# A ChatML-style template: each assistant turn ends with <|im_end|>, which training must supervise.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
    "user assistant system: hello, how are you? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Reverse the word: stone -> enots. Capitalize: river -> RIVER. Count to five: 1 2 3 4 5.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
] * 20


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with BOS/EOS, no pad token, and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer Llama (hidden 64, intermediate 192, 4 heads / 2 kv heads), fp32, random weights from `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama + tokenizer, loadable with from_pretrained(dir). Treat it as read-only."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh fp32 tiny Llama (same seed every time)."""
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def learnable_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama whose output head is large enough to express a learned answer.

    With the default init (std 0.02) a 64-wide model's logits span about ±1, so no adapter can push the loss far
    below log(vocab); std 0.3 leaves room to learn.
    """
    path = tmp_path_factory.mktemp("learnable-llama")
    build_tiny_llama(len(tiny_tokenizer), initializer_range=0.3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process `lorafit train` gets a new Accelerator, as each CLI process does.

    accelerate keeps its state (mixed precision included) in process-wide singletons; a run in fp32 followed by one
    in bf16 in the same test process would otherwise be refused.
    """
    yield
    import sys

    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
