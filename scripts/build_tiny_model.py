"""Build assets/tiny-llama: a byte-level BPE tokenizer and a ~3.5M-parameter Llama pretrained on Python's own docs.

    python scripts/build_tiny_model.py                    # ~12 minutes on 2 CPU cores; writes assets/tiny-llama
    python scripts/build_tiny_model.py --steps 50 --out /tmp/tiny   # a quick look

Everything comes with Python: the language reference (`pydoc_data.topics`) and the docstrings of a fixed list of
stdlib modules fill half of every batch. The other half is instruction-format text (Alpaca prompts and ChatML
turns) for other word tasks ("Copy the word:", "Swap the two words:", ...), drawn fresh at every step, on words that
neither are the quickstart task's words nor start with their tokens: the model learns the prompt template and to
copy from its prompt, but has never seen the task ("Repeat the word twice: ...", see scripts/make_task_data.py).
The build reports how many of the task's held-out words the model copies when asked to (`copies_heldout_words` in
build_stats.json).

Deterministic: fixed seeds, a fixed thread count, deterministic algorithms; the same machine type, Python (its
pydoc_data) and torch give the same weights. The result is committed, so nobody has to run this to use lorafit.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import random
import string
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package
from make_task_data import INSTRUCTION, pretraining_words, split_words  # noqa: E402

from lorafit.data.formats import alpaca_prompt  # noqa: E402 - the exact template lorafit trains with

SEED = 1234
VOCAB_SIZE = 3072
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0..5, in this order
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-shaped and small. Widths are multiples of 64: bitsandbytes' 4-bit CPU kernel needs that for QLoRA tests.
MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=640,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=True,  # copying a token then generalizes to tokens never copied in pretraining
)
STDLIB_MODULES = (
    "abc argparse base64 bisect calendar collections contextlib copy csv dataclasses datetime difflib enum fractions "
    "functools glob heapq inspect io itertools json logging math operator os pathlib pickle random re shutil "
    "statistics string subprocess tempfile textwrap threading time typing unittest uuid zipfile"
).split()
# Warm-up word tasks in the Alpaca template. None of them is the quickstart task. Most copy from the prompt: a model
# this small only learns to copy (what "repeat twice" builds on) when a good share of its text rewards it.
WORD_TASKS = {
    "Copy the word:": lambda w: w,
    "Uppercase the word:": str.upper,
    "Capitalize the word:": str.capitalize,
}
PAIR_TASKS = {
    "Copy the words:": lambda a, b: f"{a} {b}",
    "Swap the two words:": lambda a, b: f"{b} {a}",
    "Join the two words with a hyphen:": lambda a, b: f"{a}-{b}",
    "Write the second word:": lambda a, b: b,
    "Write the first word:": lambda a, b: a,
}


# ------------------------------------------------------------------------------------------------ text


def reference_documents() -> list[str]:
    """The language reference's topics and stdlib docstrings, one document each, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
                if doc := inspect.getdoc(obj):
                    docs.append(f"{name}.{attr}: {doc}")
    return [d for d in docs if d.strip()]


def random_word(rng: random.Random, words: list[str], allowed: Callable[[str], bool], pieces: list[str] = ()) -> str:
    """A word to copy: a real word from the pretraining pool, a fresh string of 3-8 random letters, or (given
    `pieces`) one or two tokenizer pieces glued together, a third of the time each; always one `allowed` accepts.

    Only words that vary this much teach the model to copy from its prompt: a fixed pool of words gets memorized
    (word -> answer), and then a LoRA run on new words has no copying mechanism to build on. The pieces spread the
    copying over most of the vocabulary, so it carries over to the held-out words' tokens.
    """
    while True:
        kind = rng.randrange(3 if pieces else 2)
        if kind == 0:
            word = rng.choice(words)
        elif kind == 1:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        else:
            word = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 2)))
        if allowed(word):  # glued pieces or random letters can spell a task word ("dis" + "play")
            return word


def vocabulary_pieces(tokenizer, exclude: Iterable[str]) -> list[str]:
    """The tokenizer's purely lowercase-alphabetic tokens (a leading-space marker dropped), sorted, minus `exclude`."""
    pieces = {t.lstrip("\u0120") for t in tokenizer.get_vocab()}  # byte-level BPE writes a leading space as U+0120
    return sorted(p for p in pieces - set(exclude) if p.isascii() and p.isalpha() and p.islower())


def instruction_example(
    rng: random.Random, words: list[str], allowed: Callable[[str], bool], chat: bool, pieces: list[str] = ()
) -> tuple[str, str]:
    """One (prompt, response) pair for a random warm-up word task, in the Alpaca template or as a ChatML turn."""
    instruction, fn = rng.choice(list(WORD_TASKS.items()) + list(PAIR_TASKS.items()))
    if instruction in PAIR_TASKS:
        a = b = random_word(rng, words, allowed, pieces)
        while b == a:  # "Copy the words: flag flag" -> " flag flag" would be the quickstart task's answer
            b = random_word(rng, words, allowed, pieces)
        text_in, answer = f"{a} {b}", fn(a, b)
    else:
        text_in = random_word(rng, words, allowed, pieces)
        answer = fn(text_in)
    answer = " " + answer  # as in the task data: the answer's words tokenize like the prompt's (see there)
    if not chat:
        return alpaca_prompt(f"{instruction} {text_in}", ""), answer
    # the chat template's rendering: the model should know <|im_start|>/<|im_end|> too
    return f"<|im_start|>user\n{instruction} {text_in}<|im_end|>\n<|im_start|>assistant\n", answer + "<|im_end|>"


class TaskWordGuard:
    """Says whether a warm-up word stays clear of the quickstart task's train and eval words: it is none of them
    and, given the tokenizer, its tokens do not start with one's ("avoided" starts with the token of "avoid").
    Some words of the prompt templates ("Write a response", "Copy the word:") are train words of the task too: they
    appear in every prompt, but never as the word to copy."""

    def __init__(self, tokenizer=None):
        self.words = frozenset(w for split in ("train", "eval") for w in split_words()[split])
        self.tokenizer = tokenizer
        self.prefixes = {self._ids(w) for w in self.words} if tokenizer is not None else set()

    def _ids(self, word: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(" " + word, add_special_tokens=False)["input_ids"])  # as after "word:"

    def __call__(self, word: str) -> bool:
        if word in self.words:
            return False
        if self.tokenizer is None:
            return True
        ids = self._ids(word)
        return not any(ids[:k] in self.prefixes for k in range(1, len(ids) + 1))


def instruction_examples(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` warm-up examples, one in ten a ChatML turn (the tokenizer's training text)."""
    words, guard = pretraining_words(), TaskWordGuard()
    return [instruction_example(rng, words, guard, rng.random() < 0.1) for _ in range(n)]


class ExampleBlocks:
    """An endless supply of token blocks packed with freshly drawn warm-up examples.

    Drawn fresh at every step (only examples on pool words recur, and rarely): a fixed set of examples seen many
    times gets memorized (prompt -> answer), and the model then never learns to copy from its prompt, which is all
    a LoRA run on new words can build on.
    """

    def __init__(self, tokenizer, block: int, seed: int):
        self.tokenizer, self.block = tokenizer, block
        self.rng = random.Random(seed)
        self.guard = TaskWordGuard(tokenizer)
        self.words = [w for w in pretraining_words() if self.guard(w)]
        self.pieces = vocabulary_pieces(tokenizer, exclude=self.guard.words)

    def example(self) -> tuple[str, str]:
        """One fresh (prompt, response) pair."""
        return instruction_example(self.rng, self.words, self.guard, self.rng.random() < 0.1, self.pieces)

    def _ids(self, prompt: str, response: str) -> list[int]:
        # exactly as lorafit tokenizes a row: prompt with BOS, the response on its own, then EOS
        tok = self.tokenizer
        return tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    def take(self, n: int) -> torch.Tensor:
        """(n, block) token ids."""
        rows = []
        for _ in range(n):
            ids: list[int] = []
            while len(ids) < self.block:
                ids += self._ids(*self.example())
            rows.append(ids[: self.block])
        return torch.tensor(rows)


# ------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer (BOS added to every encoding) with pad/unk, ChatML tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_stream(tokenizer, docs: list[str], rng: random.Random) -> list[int]:
    """The documents, shuffled, as one stream of ids: <s> text </s> each."""
    pieces = [tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs]
    rng.shuffle(pieces)
    return [t for p in pieces for t in p]


# ------------------------------------------------------------------------------------------------ model


def build_model(tokenizer):
    """A randomly initialized LlamaForCausalLM of MODEL_SHAPE over the tokenizer's vocabulary (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def block_loss(model, blocks: torch.Tensor) -> float:
    """Mean next-token loss over `blocks` (N, T)."""
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [model(input_ids=b[None], labels=b[None]).loss.float() for b in blocks]
    model.train()
    return float(torch.stack(losses).mean())


@torch.no_grad()
def copy_accuracy(model, tokenizer, words: list[str]) -> float:
    """Share of `words` the model copies exactly, greedily, when asked "Copy the word: W" in the Alpaca template:
    the ability the quickstart's LoRA run builds on, measured on the quickstart's held-out words."""
    model.eval()
    right = 0
    for word in words:
        ids = tokenizer(alpaca_prompt(f"Copy the word: {word}", ""), return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        right += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == word
    model.train()
    return right / len(words)


def pretrain(
    model, blocks: torch.Tensor, examples: ExampleBlocks, steps: int, batch_size: int, lr: float, seed: int, task_share: float
) -> list[float]:
    """AdamW over batches of random document `blocks` (N, T) and, for `task_share` of each batch, fresh warm-up
    example blocks, in bf16 autocast (AMX/AVX-512 CPUs run it several times faster than fp32; the weights and
    optimizer stay fp32). Returns the loss of every step."""
    n_task = round(batch_size * task_share)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        docs = blocks[torch.randint(len(blocks), (batch_size - n_task,), generator=gen)]
        batch = torch.cat([docs, examples.take(n_task)])  # (B, T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            recent = sum(losses[-25:]) / len(losses[-25:])
            print(f"step {step + 1:4d}/{steps}  loss {recent:.3f}  {time.perf_counter() - started:5.0f}s", flush=True)
    return losses


# ------------------------------------------------------------------------------------------------ main


def save(model, tokenizer, out: Path, stats: dict) -> None:
    """Weights in bfloat16 safetensors (half the size; the quickstart loads them as float32), tokenizer, card."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "build_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    card = (
        f"# tiny-llama\n\nA {stats['parameters'] / 1e6:.2f}M-parameter Llama ({MODEL_SHAPE['num_hidden_layers']} "
        f"layers, hidden {MODEL_SHAPE['hidden_size']}) with a {stats['vocab_size']}-token byte-level BPE "
        f"tokenizer, pretrained for {stats['steps']} steps ({stats['tokens_seen'] / 1e6:.2f}M tokens) on Python's "
        f'language reference and stdlib docstrings, plus Alpaca/ChatML word tasks (never "{INSTRUCTION}").\n'
        f"Final training loss {stats['final_train_loss']:.3f} (batches half documents, half word tasks); loss on "
        f"held-out documents {stats['heldout_loss']:.3f} (it has memorized much of its small corpus). Asked "
        f'"Copy the word: W", it copies {stats["copies_heldout_words"]:.0%} of the quickstart task\'s held-out words.\n\n'
        f"Built by `python scripts/build_tiny_model.py` for lorafit's quickstart and tests; it knows little "
        f"beyond the template.\n"
    )
    (out / "README.md").write_text(card)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:  python scripts/build_tiny_model.py --out assets/tiny-llama",
    )
    parser.add_argument("--out", type=Path, default=Path("assets/tiny-llama"), help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per step (default: %(default)s)")
    parser.add_argument("--block", type=int, default=256, help="tokens per block (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument(
        "--task-share", type=_fraction, default=0.5, help="share of each batch that is word tasks, 0-1 (default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads; results depend on it (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="seed for everything (default: %(default)s)")
    args = parser.parse_args()

    started = time.perf_counter()
    transformers.logging.set_verbosity_error()  # whole documents are longer than the model's context: expected
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    docs = reference_documents()
    examples = instruction_examples(rng, 6600)  # for the tokenizer: it should know the template's pieces
    tokenizer = train_tokenizer(docs + [p + r for p, r in examples])
    stream = torch.tensor(token_stream(tokenizer, docs, rng))
    blocks = stream[: len(stream) // args.block * args.block].view(-1, args.block)  # (N, T)
    heldout, blocks = blocks[:16], blocks[16:]
    print(
        f"{len(docs)} documents = {len(stream):,} tokens ({len(blocks)} blocks of {args.block}), plus fresh "
        f"warm-up examples for {args.task_share:.0%} of each batch; tokenizer {len(tokenizer)} tokens "
        f"({time.perf_counter() - started:.0f}s)",
        flush=True,
    )

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    example_blocks = ExampleBlocks(tokenizer, args.block, args.seed + 1)  # its own stream
    losses = pretrain(model, blocks, example_blocks, args.steps, args.batch_size, args.lr, args.seed, args.task_share)
    final = sum(losses[-25:]) / len(losses[-25:])
    stats = {
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * args.block,
        "corpus_tokens": len(stream),
        "final_train_loss": round(final, 4),
        "heldout_loss": round(block_loss(model, heldout), 4),
        "copies_heldout_words": copy_accuracy(model, tokenizer, split_words()["eval"]),
        "seconds": round(time.perf_counter() - started),
        "threads": args.threads,
        "seed": args.seed,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    save(model, tokenizer, args.out, stats)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(
        f"final pretraining loss {final:.3f} (last 25 steps), held-out {stats['heldout_loss']:.3f}; "
        f"saved {args.out} ({size:.1f} MB) in {stats['seconds']}s"
    )


if __name__ == "__main__":
    main()
