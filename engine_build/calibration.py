"""Calibration data and the forward loop ModelOpt runs over it.

`calibration_batch` draws `num_samples` windows of `seq_len` tokens from a token stream at seeded
random offsets (overlapping when the text is shorter than num_samples * seq_len, which the report
says). ModelOpt calls the forward loop once per calibration pass: `max` statistics need one pass,
SmoothQuant and AWQ two (statistics, then the search of their scales).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Passes each ModelOpt algorithm makes over the calibration set (for the progress fraction).
PASSES = {None: 1, "max": 1, "smoothquant": 2, "awq_lite": 2}


@dataclass(frozen=True)
class CalibrationSet:
    input_ids: torch.Tensor  # [num_samples, seq_len] int64
    source: str  # "builtin" or the file
    text_tokens: int  # tokens in the whole text
    overlapping: bool  # the samples share tokens (the text is shorter than they are together)
    seed: int

    def describe(self, batch_size: int, passes: int) -> dict:
        samples, seq_len = self.input_ids.shape
        return {
            "source": self.source,
            "samples": samples,
            "seq_len": seq_len,
            "tokens": samples * seq_len,
            "text_tokens": self.text_tokens,
            "overlapping": self.overlapping,
            "seed": self.seed,
            "batch_size": batch_size,
            "passes": passes,
        }


def calibration_batch(
    stream: list[int], num_samples: int, seq_len: int, source: str, seed: int = 0
) -> CalibrationSet:
    if num_samples < 1:
        raise ValueError(f"--calib-size must be >= 1, got {num_samples}")
    if seq_len < 2:
        raise ValueError(f"--calib-seq-len must be >= 2, got {seq_len}")
    if len(stream) < seq_len:
        raise ValueError(
            f"the calibration text ({source}) has {len(stream)} tokens, fewer than one sample of "
            f"--calib-seq-len {seq_len}"
        )
    ids = torch.tensor(stream, dtype=torch.int64)
    span = len(stream) - seq_len + 1  # possible start offsets
    generator = torch.Generator().manual_seed(seed)
    if num_samples * seq_len <= len(stream):
        # Disjoint windows: a random choice of num_samples slots of seq_len tokens.
        slots = torch.randperm(len(stream) // seq_len, generator=generator)[:num_samples]
        starts = slots * seq_len
        overlapping = False
    else:
        starts = torch.randint(0, span, (num_samples,), generator=generator)
        overlapping = True
    rows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # [num_samples, seq_len]
    return CalibrationSet(rows, source, len(stream), overlapping, seed)


ProgressFn = Callable[[int, int, int], None]  # (pass index from 1, batches done, batches per pass)


def forward_loop(
    calib: CalibrationSet,
    batch_size: int,
    device: torch.device,
    on_batch: ProgressFn | None = None,
) -> Callable[[torch.nn.Module], None]:
    """The `forward_loop` for `mtq.quantize`: every sample through the model, `batch_size` rows
    at a time (AWQ's search costs about the same per call whatever the batch, so larger batches
    calibrate much faster)."""
    if batch_size < 1:
        raise ValueError(f"--calib-batch-size must be >= 1, got {batch_size}")
    batches = list(torch.split(calib.input_ids, batch_size))
    passes = 0

    def loop(model: torch.nn.Module) -> None:
        nonlocal passes
        passes += 1
        for i, batch in enumerate(batches):
            with torch.no_grad():
                model(input_ids=batch.to(device), use_cache=False)
            if on_batch is not None:
                on_batch(passes, i + 1, len(batches))

    return loop
