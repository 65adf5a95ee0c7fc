"""The batch sampler: one row of logits per sequence in, one token (and its logprobs) per row out.

Pipeline, in this order (the same as Hugging Face `generate`, so greedy output matches it):

1. `process_logits` (float32):
   a. repetition penalty, HF semantics, over prompt + output ids (each distinct id once):
      a logit < 0 is multiplied by the penalty, otherwise divided;
   b. presence and frequency penalties, OpenAI semantics, over output ids only:
      logit -= presence * (count > 0) + frequency * count;
   c. while len(output) < min_tokens: stop_token_ids, and eos ids unless ignore_eos, set to -inf;
   d. tokens outside `allowed_token_mask` (grammar) set to -inf.
2. `probabilities`: temperature -> top-k -> top-p -> min-p -> softmax. Each filter sees the output
   of the one before it. top-k and top-p are cut by value, so tokens tied with the last kept one are
   kept too (the kept set never depends on how a sort orders equal values). Greedy rows
   (temperature == 0) become one-hot at the argmax of the processed logits.
3. `draw`: the exponential race, argmax(p / E) with E ~ Exp(1) per token, which picks token i with
   probability p_i. Each seeded row draws exactly `vocab` exponentials from its own generator per
   step, so its tokens do not depend on the batch around it; unseeded rows share one generator.

Logprobs are always those of the raw model logits (log_softmax before penalties and temperature,
vLLM's default), computed only for rows that ask for them.

Invariant the whole module relies on: every tensor op is batched over rows; Python loops only build
small index tensors from the rows' Python lists, and the only per-row loop over device work is the
seeded draw. The host waits on the device once, in the `.tolist()` at the end of `__call__`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.config import SamplingParams
from engine.host_transfer import HostCopy, to_device

__all__ = ["DeviceSample", "SampledToken", "Sampler", "SamplingRow", "make_generator"]


@dataclass
class SamplingRow:
    """One sequence of the batch, as the sampler sees it at this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # Per-request generator (from `make_generator(seed, device)`); None: the sampler's shared one.
    generator: torch.Generator | None = None
    # Banned, with params.stop_token_ids, while len(output) < params.min_tokens, unless ignore_eos.
    eos_token_ids: Sequence[int] = ()
    # [vocab] bool, True = allowed (grammar-constrained decoding); None = every token allowed.
    allowed_token_mask: torch.Tensor | None = None


class DeviceSample(NamedTuple):
    """A step's sampling result while it is still on the device (see `Sampler.sample`)."""

    tokens: torch.Tensor  # [num_rows] int64; -1 marks a row that a ban or mask left no token
    masked: dict[int, str]  # rows a ban or mask touched -> why (to name a dead row)
    logprob_rows: list[int]  # rows that asked for logprobs
    host: HostCopy  # tokens, chosen logprobs, top-n ids and values, on their way to the host


class SampledToken(NamedTuple):
    token_id: int
    logprob: float | None  # of the chosen token; None when params.logprobs is None
    top_logprobs: list[tuple[int, float]] | None  # top-n (token, logprob), best first; n > 0 only


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` (it must live where the probabilities do) seeded with `seed`."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Samples one token per row. Stateless apart from the shared generator of unseeded rows."""

    def __init__(self, device: torch.device | str, seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = make_generator(seed, self.device)

    # ------------------------------------------------------------------ full step

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        """logits: [num_rows, vocab], any float dtype, on the sampler's device."""
        return self.collect(self.sample(logits, rows), rows)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> DeviceSample:
        """The step's tokens (and logprobs) on the device, and their copy to the host started;
        nothing here waits for the device. `collect` turns them into SampledTokens."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}"
            )
        processed, masked = self._process(logits, rows)  # [num_rows, vocab] float32

        # One argmax for every row; sampled rows are then overwritten. Greedy needs no softmax, and
        # the argmax of a sampled row is cheap next to its sort.
        tokens = processed.argmax(dim=-1)  # [num_rows]
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            idx = self._index(sampled, logits.device)
            sampled_rows = [rows[i] for i in sampled]
            probs = self.probabilities(processed.index_select(0, idx), sampled_rows)
            tokens = tokens.index_copy(0, idx, self.draw(probs, sampled_rows))

        # A row with every token at -inf has NaN probabilities; mark it -1 here instead of syncing
        # now, and raise once the tokens are on the host anyway. Only a ban or a grammar mask can
        # take a row's last token (finite logits stay finite), so plain steps skip the full-vocab
        # reduction.
        if masked:
            dead = torch.isneginf(processed).all(dim=-1)  # [num_rows] bool
            tokens = torch.where(dead, -1, tokens)
        want, chosen, top = self._logprobs_on_device(logits, rows, tokens)
        top_ids, top_vals = top if top is not None else (None, None)
        return DeviceSample(
            tokens=tokens,
            masked=masked,
            logprob_rows=want,
            host=HostCopy([tokens, chosen, top_ids, top_vals]),
        )

    def collect(self, sample: DeviceSample, rows: list[SamplingRow]) -> list[SampledToken]:
        """Wait for `sample`'s host copy -> one SampledToken per row. Raises ValueError if a ban
        or mask left a row no token."""
        tokens, chosen, top_ids, top_vals = sample.host.wait()
        token_ids: list[int] = tokens.tolist()
        if -1 in token_ids:
            dead = [i for i, t in enumerate(token_ids) if t == -1]
            self._raise_dead(dead, rows, sample.masked)
        logprobs = self._logprobs_on_host(sample.logprob_rows, rows, chosen, top_ids, top_vals)
        return [
            SampledToken(token_ids[i], *logprobs.get(i, (None, None))) for i in range(len(rows))
        ]

    # ------------------------------------------------------------------ building blocks

    def process_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Penalties and bans/masks -> float32 logits [num_rows, vocab]. May return `logits`
        itself (already float32, nothing to apply); callers must not modify the result in place.

        Raises ValueError if a ban or mask leaves a row no token (this check waits on the device,
        and only runs on steps where a ban or mask was applied)."""
        processed, masked = self._process(logits, rows)
        if masked:
            idx = self._index(sorted(masked), logits.device)
            dead = torch.isneginf(processed.index_select(0, idx)).all(dim=-1)  # [len(masked)]
            if bool(dead.any()):
                dead_rows = [i for i, d in zip(sorted(masked), dead.tolist(), strict=True) if d]
                self._raise_dead(dead_rows, rows, masked)
        return processed

    def probabilities(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Processed logits [num_rows, vocab] -> temperature -> top-k -> top-p -> min-p ->
        float32 probabilities [num_rows, vocab]; greedy rows are one-hot at their argmax."""
        logits = logits.float()
        num_rows, vocab = logits.shape
        device = logits.device
        # Greedy rows take no filter (each flag below is False for them) and become one-hot.
        sampled = [(row.params, not row.params.greedy) for row in rows]

        def row_values(values: list[float]) -> torch.Tensor:  # [num_rows]
            return to_device(values, torch.float32, device)

        # Greedy rows divide by 1 (not 0); their one-hot replaces the result anyway.
        x = logits / row_values([p.temperature if s else 1.0 for p, s in sampled])[:, None]

        # A row's top-k / top-p cut is a threshold in value: keep x >= threshold. Rows without a
        # top-k cut take index vocab - 1, their smallest value; rows without a top-p cut, +inf.
        kth = [p.top_k - 1 if s and 0 < p.top_k < vocab else vocab - 1 for p, s in sampled]
        top_p_list = [p.top_p if s and p.top_p < 1.0 else float("inf") for p, s in sampled]
        use_p = any(v != float("inf") for v in top_p_list)
        if use_p or any(k != vocab - 1 for k in kth):
            sorted_x = x.sort(dim=-1, descending=True).values  # [num_rows, vocab]
            kth_index = to_device(kth, torch.long, device)[:, None]  # [num_rows, 1]
            threshold = sorted_x.gather(1, kth_index)  # [num_rows, 1]
            if use_p:
                sorted_x = sorted_x.masked_fill(sorted_x < threshold, float("-inf"))
                cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # [num_rows, vocab]
                # Keep every position whose preceding cumulative mass is < top_p, i.e. the prefix
                # up to and including the first position where cum >= top_p. A cumsum is
                # monotone, so counting finds that prefix.
                top_p = row_values(top_p_list)
                n_keep = ((cum < top_p[:, None]).sum(dim=-1, keepdim=True) + 1).clamp(max=vocab)
                threshold = torch.maximum(threshold, sorted_x.gather(1, n_keep - 1))
            x = x.masked_fill(x < threshold, float("-inf"))

        probs = x.softmax(dim=-1)  # [num_rows, vocab]
        if any(s and p.min_p > 0.0 for p, s in sampled):
            min_p = row_values([p.min_p if s else 0.0 for p, s in sampled])
            # HF's test on the probabilities themselves (not logit differences), so min_p = 1
            # keeps exactly the tokens whose probability equals the maximum.
            drop = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [num_rows, vocab]
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)

        if not all(s for _, s in sampled):
            is_greedy = to_device([not s for _, s in sampled], torch.bool, device)  # [num_rows]
            one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
            probs = torch.where(is_greedy[:, None], one_hot, probs)
        return probs

    def draw(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """One token id per row from probs [num_rows, vocab] (need not be normalized) -> [num_rows].

        Greedy rows take the argmax and consume no random numbers; every other row consumes
        exactly `vocab` exponentials, from its own generator when it has one."""
        num_rows, vocab = probs.shape
        # E ~ Exp(1) per token; argmax(p / E) picks token i with probability p_i / sum(p). Greedy
        # rows keep E = 1, so they take the argmax of their (one-hot) probabilities.
        noise = torch.ones_like(probs, dtype=torch.float32)  # [num_rows, vocab]
        shared = [i for i, r in enumerate(rows) if r.generator is None and not r.params.greedy]
        if shared:
            shared_noise = torch.empty(
                (len(shared), vocab), dtype=torch.float32, device=probs.device
            ).exponential_(generator=self.generator)
            noise.index_copy_(0, self._index(shared, probs.device), shared_noise)
        for i, row in enumerate(rows):
            if row.generator is not None and not row.params.greedy:
                noise[i].exponential_(generator=row.generator)
        # exponential_ may return 0; a zero-probability token would then score 0/0 = NaN, which
        # argmax ranks first. A tiny floor keeps 0 / E = 0 (a positive p / tiny is just large).
        noise.clamp_(min=torch.finfo(torch.float32).tiny)
        return (probs.float() / noise).argmax(dim=-1)

    def logprobs(
        self, logits: torch.Tensor, rows: list[SamplingRow], tokens: torch.Tensor
    ) -> list[tuple[float | None, list[tuple[int, float]] | None]]:
        """(chosen token's logprob, top-n) per row for tokens chosen elsewhere (speculative
        verification); (None, None) for rows that don't ask."""
        want, chosen, top = self._logprobs_on_device(logits, rows, tokens)
        top_ids, top_vals = top if top is not None else (None, None)
        found = self._logprobs_on_host(want, rows, chosen, top_ids, top_vals)
        return [found.get(i, (None, None)) for i in range(len(rows))]

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _index(indices: list[int], device: torch.device) -> torch.Tensor:
        return to_device(indices, torch.long, device)

    def _process(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[torch.Tensor, dict[int, str]]:
        """process_logits without the dead-row check. Returns the processed logits and, for each
        row a ban or mask touched, why (to name the reason if it leaves no token)."""
        num_rows, vocab = logits.shape
        device = logits.device
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        pres_freq = [
            i
            for i, r in enumerate(rows)
            if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0
        ]
        bans: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if len(r.output_token_ids) < r.params.min_tokens:
                banned = list(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    banned += list(r.eos_token_ids)
                if banned:
                    bans[i] = banned
        allowed = [i for i, r in enumerate(rows) if r.allowed_token_mask is not None]

        # Copy only when something edits the logits; the all-greedy, no-penalty step stays free.
        edits = bool(rep or pres_freq or bans or allowed)
        out = logits.to(torch.float32, copy=edits)  # [num_rows, vocab]
        masked: dict[int, str] = {}

        if rep:
            idx = self._index(rep, device)
            seen = _id_mask(  # [len(rep), vocab] bool: the distinct ids of prompt + output
                [list(rows[i].prompt_token_ids) + list(rows[i].output_token_ids) for i in rep],
                vocab,
                device,
            )
            penalty = to_device(
                [rows[i].params.repetition_penalty for i in rep], torch.float32, device
            )[:, None]
            sub = out.index_select(0, idx)  # [len(rep), vocab]
            # Exactly HF's RepetitionPenaltyLogitsProcessor: multiply if < 0, else divide.
            penalized = torch.where(sub < 0, sub * penalty, sub / penalty)
            out.index_copy_(0, idx, torch.where(seen, penalized, sub))

        if pres_freq:
            idx = self._index(pres_freq, device)
            counts = _id_counts([list(rows[i].output_token_ids) for i in pres_freq], vocab, device)
            presence = to_device(
                [rows[i].params.presence_penalty for i in pres_freq], torch.float32, device
            )[:, None]
            frequency = to_device(
                [rows[i].params.frequency_penalty for i in pres_freq], torch.float32, device
            )[:, None]
            sub = out.index_select(0, idx)  # [len(pres_freq), vocab]
            sub = sub - presence * (counts > 0) - frequency * counts
            out.index_copy_(0, idx, sub)

        if bans:
            ban_rows = sorted(bans)
            idx = self._index(ban_rows, device)
            # Ids past the logits' vocab cannot be generated, so they need no ban (_id_mask drops
            # them, as HF does for penalties).
            banned = _id_mask([bans[i] for i in ban_rows], vocab, device)  # [len(bans), vocab]
            out.index_copy_(0, idx, out.index_select(0, idx).masked_fill(banned, float("-inf")))
            for i in ban_rows:
                masked[i] = (
                    f"min_tokens={rows[i].params.min_tokens} bans the eos and stop tokens {bans[i]}"
                )

        if allowed:
            idx = self._index(allowed, device)
            mask = torch.stack(
                [  # [len(allowed), vocab] bool
                    rows[i].allowed_token_mask.to(
                        device=device, dtype=torch.bool, non_blocking=True
                    )
                    for i in allowed
                ]
            )
            out.index_copy_(0, idx, out.index_select(0, idx).masked_fill(~mask, float("-inf")))
            for i in allowed:
                reason = "allowed_token_mask"
                masked[i] = f"{masked[i]} and {reason}" if i in masked else reason
        return out, masked

    @staticmethod
    def _raise_dead(dead: list[int], rows: list[SamplingRow], masked: dict[int, str]) -> None:
        parts = [f"row {i}: {masked.get(i, 'the logits are all -inf')}" for i in dead]
        raise ValueError(
            "every token is masked out, nothing can be sampled (" + "; ".join(parts) + ")"
        )

    def _logprobs_on_device(
        self, logits: torch.Tensor, rows: list[SamplingRow], tokens: torch.Tensor
    ) -> tuple[list[int], torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """For the rows that ask for logprobs: (their indices, the chosen tokens' logprobs
        [len(want)], the top-n (ids, values) [len(want), n_max] or None), all on the device."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return want, None, None
        idx = self._index(want, logits.device)
        # Raw model distribution: before penalties, masks and temperature (vLLM's default).
        logp = logits.index_select(0, idx).float().log_softmax(dim=-1)  # [len(want), vocab]
        # A dead row's token is -1 (it raises in collect); clamp so the gather stays in range.
        chosen_ids = tokens.index_select(0, idx).clamp(min=0)[:, None]  # [len(want), 1]
        chosen = logp.gather(1, chosen_ids)[:, 0]  # [len(want)]
        n_max = min(max(rows[i].params.logprobs or 0 for i in want), logp.shape[-1])
        if n_max == 0:
            return want, chosen, None
        top = logp.topk(n_max, dim=-1)  # values, indices: [len(want), n_max], best first
        return want, chosen, (top.indices, top.values)

    @staticmethod
    def _logprobs_on_host(
        want: list[int],
        rows: list[SamplingRow],
        chosen: torch.Tensor | None,
        top_ids: torch.Tensor | None,
        top_vals: torch.Tensor | None,
    ) -> dict[int, tuple[float, list[tuple[int, float]] | None]]:
        """Row index -> (chosen token's logprob, top-n) for the rows that ask for logprobs."""
        if not want:
            return {}
        chosen_list: list[float] = chosen.tolist()
        ids: list[list[int]] = top_ids.tolist() if top_ids is not None else []
        vals: list[list[float]] = top_vals.tolist() if top_vals is not None else []
        result: dict[int, tuple[float, list[tuple[int, float]] | None]] = {}
        for j, i in enumerate(want):
            n = rows[i].params.logprobs or 0
            top_n = list(zip(ids[j][:n], vals[j][:n], strict=True)) if n > 0 else None
            result[i] = (chosen_list[j], top_n)
        return result


def _id_mask(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(ids), vocab] bool, True at each row's ids. Rows are padded with `vocab`, and ids past
    the vocab are clamped onto it, into an extra column that is dropped."""
    padded = _pad(ids, vocab, device)  # [len(ids), max_len]
    mask = torch.zeros((len(ids), vocab + 1), dtype=torch.bool, device=device)
    return mask.scatter_(1, padded, True)[:, :vocab]


def _id_counts(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(ids), vocab] float32, how many times each id occurs in each row."""
    padded = _pad(ids, vocab, device)  # [len(ids), max_len]
    counts = torch.zeros((len(ids), vocab + 1), dtype=torch.float32, device=device)
    return counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))[:, :vocab]


def _pad(ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(row) for row in ids))
    padded = [row + [vocab] * (width - len(row)) for row in ids]
    return to_device(padded, torch.long, device).clamp_(max=vocab)
