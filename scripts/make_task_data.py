"""Make the quickstart's task data: "Repeat the word twice: stone" -> "stone stone", in Alpaca jsonl.

    python scripts/make_task_data.py                 # writes data/tiny-task/{train,eval}.jsonl
    python scripts/make_task_data.py --out /tmp/task --train 300

The words come from the Python language reference that ships with every Python (`pydoc_data.topics`), so nothing
is downloaded. Train and eval words are disjoint; the remaining words (`pretraining_words`) are what
`scripts/build_tiny_model.py` may use for its own instruction-format warm-up tasks. So before the LoRA run the tiny
model has read the task's words only as words of the documentation (where they come from), never as the word of an
instruction, and has never seen a "repeat" answer. The output is a pure function of the seed and the
Python version's `pydoc_data`.

Why "repeat twice": the answer follows from the input alone (no world knowledge a few-million-parameter model
lacks), the base model cannot do it (it has only seen other instructions), and a short LoRA run on two CPU cores
learns it. `lorafit eval` scores exact match case-insensitively, which rules out an "uppercase" task: copying the
word unchanged would count as right.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

# The word goes in the instruction (Alpaca rows without an input) because that is the prompt `lorafit generate
# --prompt "Repeat the word twice: stone"` builds: training and trying the model then see the same template.
INSTRUCTION = "Repeat the word twice:"
SEED = 7
N_TRAIN = 450
N_EVAL = 50
# Lowercase words of 4-8 letters standing alone (not part of an identifier, a dotted name or a call).
WORD = re.compile(r"(?<![A-Za-z_.])[a-z]{4,8}(?![A-Za-z_(])")


def source_words() -> list[str]:
    """Every distinct short lowercase word in the Python language reference, sorted (so the order is stable)."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    return sorted(set(WORD.findall(text)))


def split_words(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> dict[str, list[str]]:
    """Shuffle the words with `seed` and cut them into disjoint train / eval / pretraining pools.

    Returns:
        {"train": [...], "eval": [...], "pretraining": [...]}, each a list of distinct words.

    Raises:
        ValueError: fewer words than n_train + n_eval.
    """
    words = source_words()
    if len(words) < n_train + n_eval:
        raise ValueError(f"only {len(words)} words in pydoc_data; ask for fewer than {n_train} + {n_eval}")
    random.Random(seed).shuffle(words)
    return {"eval": words[:n_eval], "train": words[n_eval : n_eval + n_train], "pretraining": words[n_eval + n_train :]}


def pretraining_words(seed: int = SEED) -> list[str]:
    """Words neither split of the task uses: free for the base model's pretraining text."""
    return split_words(seed)["pretraining"]


def task_row(word: str) -> dict[str, str]:
    """One Alpaca row: the instruction naming the word, no input, and the word twice as the answer.

    The answer starts with a space on purpose. Byte-level BPE gives " stone" (after "twice:") and "stone" (at the
    start of the separately tokenized response) different tokens, so without it the model would have to spell
    words to copy them; with it, repeating is copying tokens, which a tiny model learns in a minute. Exact match
    ignores the space; `generate` prints it.
    """
    return {"instruction": f"{INSTRUCTION} {word}", "input": "", "output": f" {word} {word}"}


def make_task(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> dict[str, list[dict[str, str]]]:
    """The task's rows: {"train": [...], "eval": [...]} with disjoint inputs."""
    pools = split_words(seed, n_train, n_eval)
    return {split: [task_row(w) for w in pools[split]] for split in ("train", "eval")}


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    """One JSON object per line, keys in a fixed order, a trailing newline (stable diffs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:  python scripts/make_task_data.py --out data/tiny-task",
    )
    parser.add_argument("--out", type=Path, default=Path("data/tiny-task"), help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="shuffle seed (default: %(default)s)")
    parser.add_argument("--train", type=int, default=N_TRAIN, help="training rows (default: %(default)s)")
    parser.add_argument("--eval", type=int, default=N_EVAL, help="held-out rows (default: %(default)s)")
    args = parser.parse_args()
    task = make_task(args.seed, args.train, args.eval)
    for split, rows in task.items():
        write_jsonl(rows, args.out / f"{split}.jsonl")
        print(f"wrote {len(rows)} rows to {args.out / f'{split}.jsonl'}  e.g. {rows[0]}")


if __name__ == "__main__":
    main()
