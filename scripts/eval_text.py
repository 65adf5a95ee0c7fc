"""Write the bundled model's held-out stream as a text file for `workbench build --eval-text`.

    python scripts/eval_text.py --corpus ../shared/corpus --tokens 20000 --out ts_valid_20k.txt

The TinyStories validation stories, split as scripts/train_tiny.py splits them, one document each
(separated by `<|endoftext|>` lines, which the build turns back into the <|endoftext|> that opens
every story): the first stories whose tokens, with that opening token, add up to at most
--tokens. With --tokens 150000 this is the stream engine/bundled/tiny/training_report.json's
perplexity is measured on, up to the story cut at its end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from tiny_data import read_valid_stories  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus directory")
    parser.add_argument("--tokens", type=int, default=20000, help="at most this many (20000)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "engine" / "bundled" / "tiny")
    stories, total = [], 0
    for story in read_valid_stories(args.corpus):
        n = 1 + len(tokenizer.encode(story, add_special_tokens=False))
        if total + n > args.tokens:
            break
        stories.append(story)
        total += n
    args.out.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(stories)} stories, {total} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
