"""The modules of a sharded model that talk to the other ranks. Each wraps what the model had
and keeps its call signature, so the model's forward is unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.group import TPGroup


class RowParallel(nn.Module):
    """A linear whose input features are split across the ranks (o_proj, down_proj): each rank
    multiplies its slice of the input by its slice of the weight's columns, and one all-reduce
    sums the partial products. The bias, when there is one, lives on rank 0 only, so it is
    added once."""

    def __init__(self, inner: nn.Module, group: TPGroup) -> None:
        super().__init__()
        self.inner = inner
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, in_features / world_size] -> [num_tokens, out_features]."""
        return self.group.all_reduce(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by rows: rank r holds token ids [r * rows, (r + 1) * rows)
    (the last rank's tail zero-padded past the vocabulary). A rank looks up the ids it holds,
    zeros the others, and one all-reduce gives every rank every token's row, exactly (one
    nonzero term per element)."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, group: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [rows, hidden]
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [num_tokens] -> [num_tokens, hidden]."""
        local = input_ids - self.vocab_start
        held = (local >= 0) & (local < self.weight.shape[0])  # [num_tokens]
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.group.all_reduce(out * held.unsqueeze(-1).to(out.dtype))


class LogitsGather:
    """lm_head split by vocabulary rows: each rank scores its rows, an all-gather puts the
    columns side by side, the padding past the vocabulary is cut."""

    def __init__(self, group: TPGroup, vocab_size: int) -> None:
        self.group = group
        self.vocab_size = vocab_size

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        """local: [rows, padded_vocab / world_size] -> [rows, vocab_size]."""
        return self.group.all_gather_last(local)[..., : self.vocab_size]
