"""How a proposer samples its drafts (the draft model's and EAGLE's alike): through the engine's
sampler, with the request's own processing (temperature, top-k/p, penalties over the drafts so
far), so the draft distribution q that rejection sampling divides by is the one drawn from."""

from __future__ import annotations

import torch

from engine.request import Request
from engine.sampler import Sampler, SamplingRow, make_generator


class DraftSampling:
    def __init__(self, sampler: Sampler, device: torch.device) -> None:
        self.sampler = sampler
        self.device = device
        self.generators: dict[str, torch.Generator | None] = {}

    def _generator(self, request: Request) -> torch.Generator | None:
        rid = request.request_id
        if rid not in self.generators:
            seed = request.params.seed
            # Seeded requests draw their drafts from a generator of their own, derived from the
            # seed, so their output does not depend on the batch around them.
            self.generators[rid] = (
                None if seed is None else make_generator(seed * 1_000_003 + 17, self.device)
            )
        return self.generators[rid]

    def row(self, request: Request, drafts: list[int]) -> SamplingRow:
        return SamplingRow(
            params=request.params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids + drafts,
            generator=self._generator(request),
            eos_token_ids=request.eos_token_ids,
        )

    def draw(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], torch.Tensor]:
        """logits [len(rows), vocab] -> (one draft token per row, q [len(rows), vocab])."""
        q = self.sampler.probabilities(self.sampler.process_logits(logits, rows), rows)
        return self.sampler.draw(q, rows).tolist(), q

    def forget(self, request: Request) -> None:
        self.generators.pop(request.request_id, None)
