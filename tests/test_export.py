"""`lorafit export`: GGUF files checked by llama.cpp itself (llama-cpp-python) against transformers.

The reference is always transformers in float32 on the same weights: the adapter on its base (unmerged, the exact
math; `rundirs.with_adapter`) for runs, the model as saved for model folders. llama.cpp loads the exported file and
must tokenize the same ids (BOS exactly once), give the same logits (relative to the largest logit; f32 within what
llama.cpp's own f32 arithmetic leaves, f16 / bf16 / q8_0 within the measured rounding of the weights) and the same
greedy completion (f32). The LoRA GGUF applied by llama.cpp to the base GGUF must equal the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp  # llama-cpp-python, in the dev extra: llama.cpp itself checks what lorafit writes
import numpy as np
import pytest
import torch
from rundirs import R, base_model, make_run, run_cli, with_adapter
from test_zoo import build_zoo_model

from lorafit.merge import SAMPLE_TEXTS
from lorafit.model import load_tokenizer

GREEDY_TOKENS = 8
# Max relative logit difference, llama.cpp vs transformers float32, measured on these tiny models (f32 KV cache):
# f32 3.7e-7..1.1e-6 (llama.cpp's own kernels and summation order; llama, mistral, qwen2, qwen3, merged runs, LoRA
# GGUF), f16 8.9e-4, bf16 8.2e-3, q8_0 1.4e-2..1.8e-2 (llama.cpp also quantizes the activations to 8 bits for its
# q8_0 matmul). Limits with room, far below what a wrong tensor, q/k order or rope gives (~1).
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2}


# ------------------------------------------------------------------------------------------------ helpers


def open_gguf(path: Path, **options):
    """llama.cpp on `path` with every position's logits and an f32 KV cache (the f16 default would round them).

    Weight repacking (llama.cpp's "extra buffer types") is off: on this Xeon (AMX) llama-cpp-python 0.3.36's
    repacked q8_0 matmul dies with a segfault on any q8_0 file, llama.cpp's own `llama_model_quantize` output too;
    unpacked, the same files run.
    """
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False, seed=0,
                               type_k=0, type_v=0, **options)
    finally:
        low.llama_model_default_params = default


def gguf_file(out: Path) -> Path:
    (file,) = out.glob("*.gguf")
    return file


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_greedy(llm, ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return out


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].double().numpy()


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    """n argmax steps, EOS included like any token (llama.cpp's generate does not stop at it either)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def compare(llm, model, tokenizer, greedy: bool) -> float:
    """Worst relative logit difference over the sample texts; tokenization (and greedy tokens) must be equal."""
    worst = 0.0
    for text in SAMPLE_TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        worst = max(worst, rel(llama_logits(llm, ids), hf_logits(model, ids)))
        if greedy:
            assert llama_greedy(llm, ids) == hf_greedy(model, ids), text
    return worst


def export(source: Path, out: Path, *args: str) -> Path:
    assert run_cli("export", str(source), "--out", str(out), *args) == 0
    return out


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> Path:
    """An alpaca LoRA run (r != alpha) on the tiny Llama."""
    return make_run(tmp_path_factory.mktemp("export"), tiny_model_dir, tiny_tokenizer)


@pytest.fixture(scope="module")
def llama_reference(tiny_model_dir, llama_run):
    return with_adapter(tiny_model_dir, llama_run)


@pytest.fixture(scope="module")
def zoo_model(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("export-zoo")

    def get(arch: str) -> Path:
        """The folder; its tokenizer as transformers loads it there (a Qwen2 folder's tokenizer class adds a pad
        token to the tiny tokenizer), and a model sized to that tokenizer."""
        path = root / arch
        if not path.exists():
            build_zoo_model(arch, len(tiny_tokenizer)).save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            build_zoo_model(arch, len(load_tokenizer(str(path)))).save_pretrained(path)
        return path

    return get


# ------------------------------------------------------------------------------------------------ merged GGUF


@pytest.mark.slow
def test_f32_run_gives_transformers_tokens_and_logits(llama_run, llama_reference, tiny_tokenizer, tmp_path, capsys):
    out = export(llama_run, tmp_path / "tiny", "--dtype", "f32")
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    file = gguf_file(out)
    assert closing.startswith(f"wrote {file} (") and "f32" in closing and f"llama-cli -m {file}" in closing
    llm = open_gguf(file)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
        assert compare(llm, llama_reference, tiny_tokenizer, greedy=True) <= TOLERANCE["f32"]
    finally:
        llm.close()


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_smaller_dtypes_stay_close(dtype, llama_run, llama_reference, tiny_tokenizer, tmp_path):
    file = gguf_file(export(llama_run, tmp_path / "tiny", "--dtype", dtype))
    llm = open_gguf(file)
    try:
        assert compare(llm, llama_reference, tiny_tokenizer, greedy=False) <= TOLERANCE[dtype]
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_architectures_give_transformers_logits(arch, zoo_model, tmp_path):
    from transformers import AutoModelForCausalLM

    path = zoo_model(arch)
    file = gguf_file(export(path, tmp_path / arch, "--dtype", "f32"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = open_gguf(file)
    try:
        assert compare(llm, model, load_tokenizer(str(path)), greedy=True) <= TOLERANCE["f32"]
    finally:
        llm.close()


@pytest.mark.slow
def test_shipped_quickstart_model_answers_as_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asset = Path(__file__).parents[1] / "assets" / "tiny-llama"
    file = gguf_file(export(asset, tmp_path / "quick", "--dtype", "f32"))
    model = AutoModelForCausalLM.from_pretrained(asset, dtype=torch.float32).eval()
    llm = open_gguf(file)
    try:
        assert compare(llm, model, AutoTokenizer.from_pretrained(asset), greedy=True) <= TOLERANCE["f32"]
    finally:
        llm.close()


@pytest.mark.slow
def test_qlora_run_exports_the_model_it_trained_on_the_dequantized_base(tmp_path, tiny_model_dir, tiny_tokenizer):
    """As `lorafit merge` merges it: llama.cpp on the export equals transformers on `lorafit merge`'s output, and
    differs from the adapter on the original full-precision weights (the quantization round trip is in it)."""
    from transformers import AutoModelForCausalLM

    from lorafit.merge import merge_adapter

    quant = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, quantization=quant)
    merge_adapter(run, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    llm = open_gguf(gguf_file(export(run, tmp_path / "gguf", "--dtype", "f32")))
    try:
        assert compare(llm, merged, tiny_tokenizer, greedy=True) <= TOLERANCE["f32"]
        assert compare(llm, with_adapter(tiny_model_dir, run), tiny_tokenizer, greedy=False) > 1e-3
    finally:
        llm.close()


def test_q8_0_keeps_tensors_of_odd_width_in_f16(tmp_path, tiny_tokenizer, capsys):
    import gguf
    from conftest import build_tiny_llama
    from transformers import AutoModelForCausalLM

    path = tmp_path / "odd"
    build_tiny_llama(len(tiny_tokenizer), intermediate_size=200).save_pretrained(path)  # 200 % 32 != 0
    tiny_tokenizer.save_pretrained(path)
    file = gguf_file(export(path, tmp_path / "q8", "--dtype", "q8_0"))
    printed = capsys.readouterr().out
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(file).tensors}
    odd = {n for n in types if n.endswith("ffn_down.weight")}
    assert {n: types[n] for n in odd} == dict.fromkeys(odd, gguf.GGMLQuantizationType.F16)
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "kept in f16" in printed and "blk.0.ffn_down.weight" in printed
    llm = open_gguf(file)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert compare(llm, model, tiny_tokenizer, greedy=False) <= TOLERANCE["q8_0"]
    finally:
        llm.close()


# ------------------------------------------------------------------------------------------------ chat, Modelfile


@pytest.mark.slow
def test_chat_run_ends_turns_with_its_special_token(tmp_path, tiny_model_dir, tiny_tokenizer):
    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, fmt="chat")
    out = export(run, tmp_path / "chat", "--dtype", "f32")
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.splitlines()[0] == f"FROM ./{gguf_file(out).name}"
    assert 'PARAMETER stop "</s>"' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "TEMPLATE" not in modelfile  # Ollama reads the chat template from the GGUF
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    llm = open_gguf(gguf_file(out))
    try:
        assert llm.metadata["tokenizer.chat_template"] == tiny_tokenizer.chat_template
        assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == end
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, end)
        text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Reverse the word: stone"}],
                                                  tokenize=False, add_generation_prompt=True)
        ids = tiny_tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids  # special tokens whole, one BOS
        assert compare(llm, with_adapter(tiny_model_dir, run), tiny_tokenizer, greedy=True) <= TOLERANCE["f32"]
    finally:
        llm.close()


def test_alpaca_run_modelfile_frames_the_prompt_as_training_did(llama_run, tmp_path):
    from lorafit.data import alpaca_prompt

    modelfile = (export(llama_run, tmp_path / "alpaca", "--dtype", "q8_0") / "Modelfile").read_text()
    assert f'TEMPLATE """{alpaca_prompt("{{ .Prompt }}", "")}"""' in modelfile
    assert [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")] == \
        ['PARAMETER stop "</s>"']


# ------------------------------------------------------------------------------------------------ LoRA GGUF


def lora_matches_merged(base_dir: Path, source: Path, tokenizer, tmp_path: Path) -> float:
    """llama.cpp's base GGUF + the source's LoRA GGUF vs transformers' base + adapter: max relative logit diff."""
    from lorafit.adapters.peft_io import load_adapter

    base = gguf_file(export(base_dir, tmp_path / "base", "--dtype", "f32"))
    lora = gguf_file(export(source, tmp_path / "lora", "--format", "gguf-lora", "--dtype", "f32"))
    reference = base_model(base_dir)
    load_adapter(reference, source / "adapter" if (source / "adapter").is_dir() else source, dropout=0.0)
    llm = open_gguf(base, lora_path=str(lora))
    try:
        return compare(llm, reference.eval(), tokenizer, greedy=True)
    finally:
        llm.close()


@pytest.mark.slow
def test_lora_gguf_on_the_base_gguf_equals_the_merged_model(llama_run, tiny_model_dir, tiny_tokenizer, tmp_path):
    import gguf

    assert lora_matches_merged(tiny_model_dir, llama_run, tiny_tokenizer, tmp_path) <= TOLERANCE["f32"]
    reader = gguf.GGUFReader(gguf_file(tmp_path / "lora"))
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names
    assert float(reader.get_field("adapter.lora.alpha").contents()) == R  # scale folded into B: alpha / r = 1


@pytest.mark.slow
def test_rslora_and_adalora_export_as_lora(tmp_path, tiny_model_dir, tiny_tokenizer):
    from lorafit.adapters import attach_adapter, lora_layers
    from lorafit.adapters.peft_io import save_adapter

    rs = make_run(tmp_path / "rs", tiny_model_dir, tiny_tokenizer, rslora=True)
    assert lora_matches_merged(tiny_model_dir, rs, tiny_tokenizer, tmp_path / "rs-out") <= TOLERANCE["f32"]

    model = base_model(tiny_model_dir)
    ada = {"init_r": 4, "tinit": 0.1, "tfinal": 0.2, "delta_t": 0.1, "beta1": 0.85, "beta2": 0.85,
           "orth_reg_weight": 0.5}
    attach_adapter(model, ["q_proj", "k_proj", "v_proj"], method="adalora", r=4, alpha=6.0)
    gen = torch.Generator().manual_seed(5)
    for i, layer in enumerate(lora_layers(model).values()):
        with torch.no_grad():
            layer.lora_E.normal_(0, 0.5, generator=gen)
        layer.kept = torch.tensor([True, i % 2 == 0, True, False])  # pruned to different ranks
    save_adapter(model, tmp_path / "ada", base_model_name_or_path=str(tiny_model_dir), r=2, alpha=6.0, dropout=0.0,
                 targets=["q_proj", "k_proj", "v_proj"],
                 settings={"method": "adalora", "r": 2, "alpha": 6.0, "dropout": 0.0,
                           "targets": ["q_proj", "k_proj", "v_proj"], "adalora": ada})
    tiny_tokenizer.save_pretrained(tmp_path / "ada")
    assert lora_matches_merged(tiny_model_dir, tmp_path / "ada", tiny_tokenizer, tmp_path / "ada-out") \
        <= TOLERANCE["f32"]


# ------------------------------------------------------------------------------------------------ refusals


def test_dora_and_vera_are_refused_for_gguf_lora(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    dora = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, name="dora", dora=True)
    assert run_cli("export", str(dora), "--out", str(tmp_path / "d"), "--format", "gguf-lora") == 2
    assert "export --format gguf (merged) instead" in capsys.readouterr().err
    vera = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, name="vera")
    config = vera / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "VERA"}))
    assert run_cli("export", str(vera / "adapter"), "--out", str(tmp_path / "v"), "--format", "gguf-lora") == 2
    err = capsys.readouterr().err
    assert "vera" in err and "export --format gguf (merged) instead" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "v").exists()


@pytest.mark.slow
def test_dora_run_exports_merged(tmp_path, tiny_model_dir, tiny_tokenizer):
    run = make_run(tmp_path, tiny_model_dir, tiny_tokenizer, dora=True)
    llm = open_gguf(gguf_file(export(run, tmp_path / "merged", "--dtype", "f32")))
    try:
        assert compare(llm, with_adapter(tiny_model_dir, run), tiny_tokenizer, greedy=True) <= TOLERANCE["f32"]
    finally:
        llm.close()


def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, zoo_model, llama_run, capsys, tiny_model_dir,
                                                               tiny_tokenizer):
    gpt2 = zoo_model("gpt2")
    assert run_cli("export", str(gpt2), "--out", str(tmp_path / "g")) == 2
    err = capsys.readouterr().err
    assert "'gpt2' is not supported" in err and "llama, mistral, qwen2, qwen3" in err and "Traceback" not in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert run_cli("export", str(llama_run), "--out", str(full)) == 2
    assert "not empty" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"
    assert run_cli("export", str(llama_run), "--out", str(tmp_path / "x"), "--dtype", "q4_0") == 2
    assert run_cli("export", str(tmp_path / "missing"), "--out", str(tmp_path / "y")) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # a run whose merge would fail: its base model is gone
    import shutil

    base = tmp_path / "base-copy"
    shutil.copytree(tiny_model_dir, base)
    orphan = make_run(tmp_path, base, tiny_tokenizer, name="orphan")
    shutil.rmtree(base)
    assert run_cli("export", str(orphan), "--out", str(tmp_path / "z")) == 2
    err = capsys.readouterr().err
    assert str(base) in err and "Traceback" not in err and not (tmp_path / "z").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_unsupported_tokenizer_is_refused_by_name(tmp_path, tiny_model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "words"
    base_model(tiny_model_dir).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(path)
    with pytest.raises(SystemExit) as info:
        from lorafit.cli import main

        main(["export", str(path), "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ pre-tokenizers


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_split_pre_tokenizers_tokenize_as_llama_cpp(pre, tmp_path, tiny_model_dir):
    """A Split + ByteLevel tokenizer with Llama 3's / Qwen2's regex: llama.cpp, told the name lorafit reads off the
    regex, splits text as the HF tokenizer does (digits, newlines, contractions, punctuation runs)."""
    from conftest import CORPUS
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorafit.export.vocab import SPLIT_PRE_TYPES

    pattern = next(p for p, name in SPLIT_PRE_TYPES.items() if name == pre)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
    path = tmp_path / pre
    base_model(tiny_model_dir).save_pretrained(path)
    fast.save_pretrained(path)
    llm = open_gguf(gguf_file(export(path, tmp_path / "o", "--dtype", "f32")), vocab_only=True)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == pre
        text = "I'm 12345 years old;\n\n  it's   2024!!! Don't\tstop... ABC def"
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == fast(text)["input_ids"]
    finally:
        llm.close()


def sentencepiece_style_tokenizer():
    """A tokenizer laid out as Llama 2's / Mistral's tokenizer.json: "▁" for spaces by the normalizer (with one
    put in front), BPE with byte fallback to <0xNN> pieces, and a merge for every split of every piece, in the
    pieces' order (as transformers' SentencePiece converter writes them)."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    space = "\u2581"
    trainer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="never")
    trainer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = [p for p, _ in sorted(trainer.get_vocab().items(), key=lambda item: item[1]) if p != "<unk>"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [(p[:k], p[k:]) for p in pieces for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
    tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizer_tokenizes_as_llama_cpp(tmp_path):
    """Llama 2 / Mistral-style tokenizers go in as llama.cpp's SentencePiece model: same ids as transformers, byte
    fallback for characters the vocabulary lacks, one BOS."""
    from conftest import build_tiny_llama

    fast = sentencepiece_style_tokenizer()
    path = tmp_path / "spm"
    fast.save_pretrained(path)
    build_tiny_llama(len(load_tokenizer(str(path)))).save_pretrained(path)
    llm = open_gguf(gguf_file(export(path, tmp_path / "o", "--dtype", "f32")), vocab_only=True)
    try:
        assert llm.metadata["tokenizer.ggml.model"] == "llama"
        for text in ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
                     "  two  spaces, café €5 — done", "Reverse the word: stone -> enots."]:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == fast(text)["input_ids"], text
    finally:
        llm.close()


@pytest.mark.slow
def test_run_that_added_tokens_exports_its_grown_vocabulary_and_stops_at_its_end_token(tmp_path, learnable_model_dir,
                                                                                      capsys):
    """model.add_tokens (issue 21): the GGUF has the grown vocabulary, the new end-of-turn token is llama.cpp's
    end of generation and an Ollama stop, and llama.cpp equals transformers on `lorafit merge`'s output; the LoRA
    GGUF, which cannot hold token rows, is refused."""
    from test_tokens import TURN_TEMPLATE, _override, token_config
    from transformers import AutoModelForCausalLM

    from lorafit.merge import merge_adapter

    config = _override(token_config(tmp_path, learnable_model_dir), model__add_tokens=["<|turn|>", "<|end|>"],
                       data__chat_template=TURN_TEMPLATE, train__max_steps=3)
    assert run_cli("train", str(config)) == 0
    run = tmp_path / "run"
    tokenizer = load_tokenizer(str(run / "adapter"))
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    merge_adapter(run, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    out = export(run, tmp_path / "gguf", "--dtype", "f32")
    assert 'PARAMETER stop "<|end|>"' in (out / "Modelfile").read_text()
    llm = open_gguf(gguf_file(out))
    try:
        assert llm.n_vocab() == len(tokenizer) == merged.get_input_embeddings().weight.shape[0]
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, end)
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat: stone"}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        assert rel(llama_logits(llm, ids), hf_logits(merged, ids)) <= TOLERANCE["f32"]
        assert compare(llm, merged, tokenizer, greedy=True) <= TOLERANCE["f32"]
    finally:
        llm.close()
    capsys.readouterr()
    assert run_cli("export", str(run), "--out", str(tmp_path / "lora"), "--format", "gguf-lora") == 2
    assert "token rows" in capsys.readouterr().err
