"""Prompt-lookup drafting: if the last n tokens occurred before, propose what followed them."""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram (n from max_n down to min_n); [] when no suffix repeats."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = list(tokens[length - n :])
        # Latest match first: recent context predicts best. The match must end before the suffix.
        for start in range(length - n - 1, -1, -1):
            if tokens[start] == suffix[0] and list(tokens[start : start + n]) == suffix:
                return list(tokens[start + n : start + n + k])
    return []
