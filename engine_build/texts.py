"""Text for calibration and evaluation: the built-in files, or the user's, as token streams.

A text file holds documents separated by lines that say only `<|endoftext|>` (the corpus
convention; a file without such lines is one document). A token stream is the documents' tokens,
each document opened by the tokenizer's BOS token (EOS when it has none: GPT-style tokenizers, and
the bundled models, which start every document with <|endoftext|>), concatenated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN = {
    "builtin": DATA_DIR / "calib.txt",  # --calib builtin
    "heldout": DATA_DIR / "heldout.txt",  # the default evaluation text
}
_DOC_SEPARATOR = re.compile(r"^<\|endoftext\|>[ \t]*$", re.M)


class TextError(ValueError):
    """A text file that cannot be used; the message is one line."""


def text_path(name_or_path: str | Path) -> Path:
    """ "builtin" / "heldout", or a file path (which must exist)."""
    if str(name_or_path) in BUILTIN:
        return BUILTIN[str(name_or_path)]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise TextError(f"text file {str(name_or_path)!r} does not exist or is not a file")
    return path


def read_documents(name_or_path: str | Path) -> list[str]:
    path = text_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TextError(f"{path} is not UTF-8 text") from None
    except OSError as err:
        raise TextError(f"cannot read {path}: {err.strerror or err}") from None
    docs = [d.strip("\n") for d in _DOC_SEPARATOR.split(text)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TextError(f"{path} has no text")
    return docs


def document_start_id(tokenizer: Any) -> int | None:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if isinstance(token_id, int):
            return token_id
    return None


def token_stream(tokenizer: Any, docs: list[str]) -> list[int]:
    """The documents' token ids, each document opened by BOS (else EOS)."""
    start = document_start_id(tokenizer)
    stream: list[int] = []
    for doc in docs:
        if start is not None:
            stream.append(start)
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
    return stream


def eval_windows(stream: list[int], window: int) -> list[list[int]]:
    """Windows of at most `window` tokens, each starting where the last one's final token is:
    every token but the first of the stream is scored exactly once, each with the context of its
    own window (at most window - 1 tokens)."""
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    step = window - 1
    return [stream[i : i + window] for i in range(0, max(len(stream) - 1, 1), step)]
