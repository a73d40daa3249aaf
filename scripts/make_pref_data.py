"""Make the preference quickstart's pairs from the SFT quickstart's words: "Repeat the word twice: stone" with the
right answer (" stone stone") chosen and a wrong count (" stone" or " stone stone stone") rejected.

    python scripts/make_pref_data.py                 # reads data/tiny-task, writes data/tiny-prefs/{train,eval}.jsonl

Train and eval words stay disjoint (they are data/tiny-task's own splits), so the eval pairs measure whether the
model learned "exactly twice", not the words. The prompt is the Alpaca prompt format alpaca renders (what
`lorafit generate --prompt "Repeat the word twice: stone"` builds), so the DPO run trains on what generation sees.
The output is a pure function of the input files and the seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lorafit.data.formats import alpaca_prompt

SEED = 11


def pairs(rows: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for row in rows:
        word = row["instruction"].rsplit(" ", 1)[1]
        wrong = rng.choice([1, 3])
        out.append({"prompt": alpaca_prompt(row["instruction"], ""), "chosen": f" {word} {word}",
                    "rejected": " " + " ".join([word] * wrong)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("data/tiny-task"))
    parser.add_argument("--out", type=Path, default=Path("data/tiny-prefs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(("train", "eval")):
        rows = [json.loads(line) for line in (args.source / f"{split}.jsonl").read_text().splitlines()]
        made = pairs(rows, SEED + i)
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in made))
        print(f"{args.out / split}.jsonl: {len(made)} pairs")


if __name__ == "__main__":
    main()
