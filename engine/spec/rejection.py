"""Verification by rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

For draft tokens x_1..x_k with draft distributions q_i and target distributions p_i (p has k + 1
rows: the last is for the bonus token): accept x_i while u_i <= p_i(x_i) / q_i(x_i), u_i ~ U(0, 1);
at the first rejection emit a sample of norm(max(0, p_i - q_i)) and stop; if all are accepted emit a
sample of p_{k+1}. The emitted sequence is distributed exactly as sampling from the target.
Greedy targets have one-hot p, which turns this into: accept while x_i equals the target argmax.
"""

from __future__ import annotations

import torch


def verify(
    target_probs: torch.Tensor,  # [k + 1, vocab] processed target distributions
    draft_tokens: list[int],  # k
    draft_probs: torch.Tensor | None,  # [k, vocab]; None: deterministic drafts (one-hot q)
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """-> (tokens to append: the accepted drafts plus one corrected or bonus token, num accepted).
    Consumes random numbers only from `generator`, so seeded requests stay reproducible."""
    k = len(draft_tokens)
    device = target_probs.device
    is_one_hot = bool((target_probs.max(dim=-1).values == 1.0).all())
    if is_one_hot:  # greedy: no randomness at all
        argmax = target_probs.argmax(dim=-1).tolist()  # [k + 1]
        accepted = 0
        while accepted < k and draft_tokens[accepted] == argmax[accepted]:
            accepted += 1
        return draft_tokens[:accepted] + [argmax[accepted]], accepted

    drafts = torch.tensor(draft_tokens, device=device)
    p_draft = target_probs[:k].gather(1, drafts[:, None])[:, 0]  # [k] p_i(x_i)
    q_draft = (
        torch.ones(k, device=device)
        if draft_probs is None
        else draft_probs.gather(1, drafts[:, None])[:, 0]
    )  # [k] q_i(x_i)
    u = torch.rand(k, generator=generator, device=device)
    ok = (u * q_draft <= p_draft).tolist()
    accepted = 0
    while accepted < k and ok[accepted]:
        accepted += 1
    if accepted == k:
        last = target_probs[k]
    else:
        q = (
            torch.zeros_like(target_probs[accepted]).index_fill_(
                0, drafts[accepted : accepted + 1], 1.0
            )
            if draft_probs is None
            else draft_probs[accepted]
        )
        last = (target_probs[accepted] - q).clamp_(min=0.0)
        if float(last.sum()) <= 0.0:  # p == q exactly: any token of p is a valid correction
            last = target_probs[accepted]
    token = int(torch.multinomial(last / last.sum(), 1, generator=generator))
    return draft_tokens[:accepted] + [token], accepted
