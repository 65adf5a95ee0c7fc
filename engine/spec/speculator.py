"""The engine's side of speculative decoding: propose before scheduling, verify after the
target's forward pass, roll the draft back to what was accepted."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import torch

from engine.config import EngineConfig
from engine.request import Request
from engine.sampler import Sampler, SamplingRow
from engine.spec import SpecStats, SpeculativeConfig
from engine.spec.ngram import propose_ngram
from engine.spec.rejection import verify
from engine.state import SpecState

if TYPE_CHECKING:
    from engine.model.llama import LlamaForCausalLM
    from engine.runner import SeqChunk
    from engine.spec.draft import DraftProposer
    from engine.spec.eagle_proposer import EagleProposer


class Verified(NamedTuple):
    tokens: list[int]  # accepted drafts + one corrected or bonus token
    num_rejected: int
    logprobs: list[tuple[float | None, list[tuple[int, float]] | None]]


class Speculator:
    """Speculative decoding as the engine's step sees it: `propose` before scheduling,
    `verify` a request's logits after the forward pass, `after_step` to roll the drafts back,
    `free` a request's draft state. `NoSpeculation` has the same interface and does nothing."""

    enabled = True

    def __init__(
        self,
        config: SpeculativeConfig,
        engine_config: EngineConfig,
        vocab_size: int,
        num_blocks: int,
        sampler: Sampler,
        target_model: LlamaForCausalLM | None = None,  # method "eagle" reads its hidden states
    ) -> None:
        self.config = config
        self.sampler = sampler
        self.stats = SpecStats()
        self.draft: DraftProposer | EagleProposer | None = None
        if config.method == "draft":
            from engine.spec.draft import DraftProposer

            self.draft = DraftProposer(config.model, engine_config, vocab_size, num_blocks, sampler)
        elif config.method == "eagle":
            from engine.spec.eagle_proposer import EagleProposer

            if target_model is None:
                raise ValueError("EAGLE speculation needs the target model")
            self.draft = EagleProposer(
                config.model, engine_config, target_model, num_blocks, sampler
            )
        self._proposed: list[tuple[Request, int]] = []  # (request, its length when proposed)

    def reset_stats(self) -> None:
        """Start the counters afresh (a benchmark counts its measured requests only)."""
        self.stats = SpecStats()

    def propose(self, running: list[Request], max_model_len: int) -> None:
        """Set `spec_token_ids` (and `spec_probs`) on running requests that are decoding."""
        start = time.perf_counter()
        targets, ks = [], []
        for request in running:
            if request.is_prefilling or getattr(request.params, "structured", None) is not None:
                continue
            room = min(
                request.params.max_tokens - request.num_output_tokens,
                max_model_len - request.num_tokens,
            )
            k = min(self.config.num_tokens, room - 1)  # the step also emits one target token
            if k > 0:
                targets.append(request)
                ks.append(k)
        if self.draft is not None:
            proposals = self.draft.propose(targets, ks)
        else:
            cfg = self.config
            proposals = [
                (
                    propose_ngram(r.all_token_ids, k, cfg.prompt_lookup_min, cfg.prompt_lookup_max),
                    None,
                )
                for r, k in zip(targets, ks, strict=True)
            ]
        self._proposed = []
        for request, (tokens, probs) in zip(targets, proposals, strict=True):
            request.spec_token_ids = tokens
            request.spec_probs = probs
            self._proposed.append((request, request.num_tokens))
        self.stats.draft_time_s += time.perf_counter() - start

    def after_forward(self, requests: list[Request], chunks: list[SeqChunk]) -> None:
        """The target's forward over `chunks` (one per request) has run: EAGLE keeps the hidden
        states it needs from it."""
        if self.config.method == "eagle":
            self.draft.capture(requests, chunks)

    def verify(self, request: Request, logits: torch.Tensor) -> Verified:
        """logits: [1 + k, vocab] target logits at the request's last token and its k drafts."""
        drafts = request.spec_token_ids
        k = len(drafts)
        rows = [
            SamplingRow(
                params=request.params,
                prompt_token_ids=request.prompt_token_ids,
                output_token_ids=request.output_token_ids + drafts[:i],
                generator=request.generator,
                eos_token_ids=request.eos_token_ids,
            )
            for i in range(k + 1)
        ]
        probs = self.sampler.probabilities(self.sampler.process_logits(logits, rows), rows)
        draft_probs = request.spec_probs[:k] if request.spec_probs is not None else None
        generator = request.generator or self.sampler.generator
        tokens, accepted = verify(probs, drafts, draft_probs, generator)
        n = len(tokens)
        logprobs = self.sampler.logprobs(
            logits[:n], rows[:n], torch.tensor(tokens, device=logits.device)
        )
        self.stats.num_proposed += k
        self.stats.num_accepted += accepted
        self.stats.num_verifications += 1
        self.stats.num_emitted += n
        return Verified(tokens, k - accepted, logprobs)

    def after_step(self, accepted_lengths: dict[str, int]) -> None:
        """Roll the draft cache back to the tokens that were kept (none for requests that were
        proposed for but not scheduled)."""
        if self.draft is not None:
            for request, length in self._proposed:
                if not request.is_finished:
                    self.draft.rollback(
                        request, length + accepted_lengths.get(request.request_id, 0)
                    )
        for request, _ in self._proposed:
            request.spec_token_ids = []
            request.spec_probs = None
        self._proposed = []

    def record_verify_time(self, seconds: float) -> None:
        """Add one step's time that verified drafts (the engine times its steps)."""
        self.stats.verify_time_s += seconds

    def make_stats(self) -> SpecState:
        stats = self.stats
        return SpecState(
            spec_acceptance_rate=stats.acceptance_rate,
            spec_mean_accepted=stats.mean_accepted,
            spec_draft_time_s=stats.draft_time_s,
            spec_verify_time_s=stats.verify_time_s,
        )

    def free(self, request: Request) -> None:
        if self.draft is not None:
            self.draft.free(request)


class NoSpeculation:
    """The engine without speculative decoding: no drafts, so `verify` is never called (no chunk
    has more than one logit row) and nothing needs rolling back."""

    enabled = False
    draft = None

    def propose(self, running: list[Request], max_model_len: int) -> None:
        pass

    def after_forward(self, requests: list[Request], chunks: list[SeqChunk]) -> None:
        pass

    def verify(self, request: Request, logits: torch.Tensor) -> Verified:
        raise AssertionError("a request has drafts but speculation is off")

    def after_step(self, accepted_lengths: dict[str, int]) -> None:
        pass

    def free(self, request: Request) -> None:
        pass

    def record_verify_time(self, seconds: float) -> None:
        pass

    def reset_stats(self) -> None:
        pass

    def make_stats(self) -> SpecState:
        return SpecState()
