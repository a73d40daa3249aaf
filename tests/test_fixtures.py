"""The shared fixtures behave as the other tests assume."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_dir_round_trips_and_has_no_pad_token(tiny_model_dir, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.pad_token is None and tok.eos_token == "</s>"
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.testing.assert_close(loaded(ids).logits, tiny_model(ids).logits)


def test_chat_template_ends_each_turn_with_im_end(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
    )
    assert text.count("<|im_end|>") == 2
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2
