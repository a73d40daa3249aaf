"""The tokenizer as llama.cpp reads it from GGUF metadata: tokens, their types, BPE merges, special ids, whether
BOS / EOS are added, the pre-tokenizer type and the chat template.

llama.cpp splits text before BPE with one of its built-in regex sets, chosen by `tokenizer.ggml.pre`. Its converter
picks the name by hashing the tokenization of a test string and comparing with known models, refusing any
tokenizer it has not seen. lorafit reads the split rule from tokenizer.json itself instead (`pre_tokenizer_type`):
a byte-level BPE whose split is GPT-2's regex is `gpt-2`; a Split with Llama 3's or Qwen2's regex followed by a
regex-free ByteLevel is `llama-bpe` / `qwen2`. Anything else is refused by name rather than guessed: a wrong
pre-type tokenizes differently and the model reads text it never saw.

SentencePiece-style tokenizers (Llama 2, Mistral: BPE with byte fallback on text whose spaces became "▁") go in as
llama.cpp's `llama` tokenizer model, which merges the adjacent pair whose result scores highest. Their tokenizer.json
lists a merge for every split of every piece, ordered by the piece's SentencePiece score, so each piece's score is
minus the rank of its first merge: the merge order llama.cpp follows is the one transformers follows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from lorafit.errors import LorafitError

# The split regexes of tokenizers llama.cpp has a pre-tokenizer for, as tokenizer.json writes them, and llama.cpp's
# name for each (its llama-vocab.cpp implements the same split under that name).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_PRE_TYPES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    GPT2_SPLIT: "gpt-2",
}
SUPPORTED = ("byte-level BPE with GPT-2's split (gpt-2), Llama 3's (llama-bpe) or Qwen2's (qwen2); SentencePiece-style "
             "BPE with byte fallback (Llama 2, Mistral)")
SPACE = "\u2581"  # ▁, SentencePiece's space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PROBE_TEXT = "Hello world"


@dataclass
class Vocab:
    """What `write_vocab` puts into the GGUF file."""

    tokens: list[str]
    types: list[int]
    merges: list[str]  # gpt2 only
    pre: str | None  # gpt2: llama.cpp's pre-tokenizer name; None for SentencePiece-style ("llama")
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    end_of_turn: list[int] = field(default_factory=list)  # special tokens that close a turn, besides EOS
    chat_template: str | None = None
    scores: list[float] | None = None  # llama: merge priority of each token
    add_space_prefix: bool = False  # llama: "▁" put before the text, as the tokenizer's normalizer does


def tokenizer_json(tokenizer) -> dict:
    """The fast tokenizer's full definition (tokenizer.json's content)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LorafitError(f"export: the tokenizer is a slow {type(tokenizer).__name__}, with no tokenizer.json; "
                           f"GGUF export needs a fast tokenizer ({SUPPORTED})")
    return json.loads(backend.to_str())


def sentencepiece_prefix(definition: dict) -> bool | None:
    """For a SentencePiece-style tokenizer.json (BPE with byte fallback, spaces as "▁" by a normalizer or a
    non-splitting Metaspace): whether a "▁" is put before the text. None for any other tokenizer."""
    model = definition.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    norm, pre = definition.get("normalizer"), definition.get("pre_tokenizer")
    steps = [norm] if norm is not None and norm.get("type") != "Sequence" else (norm or {}).get("normalizers", [])
    kinds = [(n.get("type"), n.get("prepend") or (n.get("pattern") or {}).get("String")) for n in steps]
    if pre is None and kinds in ([("Prepend", SPACE), ("Replace", " ")], [("Replace", " ")]):
        return bool(kinds[0][0] == "Prepend")
    if norm is None and pre is not None and pre.get("type") == "Metaspace" and not pre.get("split", True) \
            and pre.get("replacement") == SPACE:
        return pre.get("prepend_scheme", "always") in ("always", "first")
    return None


def pre_tokenizer_type(definition: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, read off its model, normalizer and pre-tokenizer.

    Raises:
        LorafitError: a tokenizer llama.cpp would split differently, named, with the supported kinds.
    """
    model = (definition.get("model") or {}).get("type")
    pre = definition.get("pre_tokenizer") or {}
    normalizer = definition.get("normalizer")
    if model != "BPE" or pre.get("type") not in ("ByteLevel", "Sequence"):
        raise LorafitError(f"export: tokenizer model {model} with pre-tokenizer {pre.get('type')} is not supported "
                           f"for GGUF; supported: {SUPPORTED}")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise LorafitError(f"export: tokenizer normalizer {normalizer.get('type')} is not supported for GGUF "
                           f"(llama.cpp's BPE applies none); supported: {SUPPORTED}")
    if pre["type"] == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise LorafitError("export: a ByteLevel pre-tokenizer with add_prefix_space is not supported for GGUF "
                               f"(llama.cpp adds no prefix space); supported: {SUPPORTED}")
        if pre.get("use_regex", True):
            return "gpt-2"
        raise LorafitError(f"export: a ByteLevel pre-tokenizer without its split regex is not supported for GGUF; "
                           f"supported: {SUPPORTED}")
    steps = pre.get("pretokenizers") or []
    kinds = [s.get("type") for s in steps]
    if kinds != ["Split", "ByteLevel"] or steps[1].get("use_regex", True) or steps[1].get("add_prefix_space"):
        raise LorafitError(f"export: pre-tokenizer Sequence[{', '.join(map(str, kinds))}] is not supported for "
                           f"GGUF; supported: {SUPPORTED}")
    pattern = (steps[0].get("pattern") or {}).get("Regex")
    if pattern not in SPLIT_PRE_TYPES or steps[0].get("behavior") != "Isolated":
        raise LorafitError(f"export: the tokenizer's split regex {pattern!r} is none llama.cpp implements; "
                           f"supported: {SUPPORTED}")
    return SPLIT_PRE_TYPES[pattern]


def build_vocab(tokenizer, vocab_size: int, end_of_turn: list[int], chat_template: str | None) -> Vocab:
    """The GGUF vocabulary of `tokenizer` for a model with `vocab_size` embedding rows.

    Rows past the tokenizer's ids (embeddings padded to a multiple) get unused `[PAD{i}]` tokens, as llama.cpp's
    converter writes them. Special added tokens are CONTROL (never produced by splitting text), other added tokens
    USER_DEFINED (matched whole, as the HF tokenizer does); SentencePiece's `<0xNN>` pieces are BYTE.

    Raises:
        LorafitError: an unsupported tokenizer, or one with more ids than the model has embedding rows.
    """
    definition = tokenizer_json(tokenizer)
    prefix = sentencepiece_prefix(definition)
    pre = pre_tokenizer_type(definition) if prefix is None else None
    model = definition["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = {a["id"]: a for a in definition.get("added_tokens", [])}
    pad = tokenizer.pad_token_id
    if pad is not None and pad >= vocab_size:
        # lorafit's tokenizer loader gives a tokenizer without one a pad token (`model.ensure_pad_token`); padding
        # never reaches a GGUF model, and a model that did not train with it has no row for it
        added.pop(pad, None)
        pad = None
    tokens, types = token_table({i: t for t, i in model["vocab"].items()}, added, vocab_size, tokenizer.unk_token_id,
                                sentencepiece=prefix is not None)
    probe = tokenizer(PROBE_TEXT)["input_ids"]  # what the HF tokenizer really adds, not what its config claims
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    vocab = Vocab(tokens, types, merges if prefix is None else [], pre, bos, eos, tokenizer.unk_token_id, pad,
                  add_bos=bos is not None and probe[:1] == [bos], add_eos=eos is not None and probe[-1:] == [eos],
                  end_of_turn=[t for t in end_of_turn if t != eos], chat_template=chat_template)
    if prefix is not None:
        vocab.scores, vocab.add_space_prefix = merge_scores(tokens, merges), prefix
    return vocab


def token_table(by_id: dict[int, str], added: dict[int, dict], vocab_size: int, unk: int | None,
                sentencepiece: bool) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0 .. vocab_size - 1."""
    import gguf

    ids = set(by_id) | set(added)
    if ids and max(ids) >= vocab_size:
        raise LorafitError(f"export: the tokenizer has token id {max(ids)} but the model only {vocab_size} embedding "
                           f"rows; the tokenizer does not belong to this model")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif i in by_id:
            tokens.append(by_id[i])
            kind = gguf.TokenType.BYTE if sentencepiece and BYTE_TOKEN.fullmatch(by_id[i]) else gguf.TokenType.NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            kind = gguf.TokenType.UNUSED
        if sentencepiece and i == unk:
            kind = gguf.TokenType.UNKNOWN
        types.append(int(kind))
    return tokens, types


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Each token's score for llama.cpp's SentencePiece merging: minus the rank of the first merge that makes it;
    pieces no merge makes (characters, bytes, specials) score below every merge, so llama.cpp, which merges any
    adjacent pair that spells a token, forms them last if at all (transformers never does)."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, i)
    return [-float(rank[t]) if t in rank else -1e9 for t in tokens]


def write_vocab(writer, vocab: Vocab) -> None:
    """The vocabulary's GGUF metadata (tokenizer.ggml.* and tokenizer.chat_template)."""
    if vocab.pre is not None:
        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_tokenizer_model("llama")  # llama.cpp's SentencePiece model
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    for value, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.unk, writer.add_unk_token_id), (vocab.pad, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    if vocab.end_of_turn:
        writer.add_eot_token_id(vocab.end_of_turn[0])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
