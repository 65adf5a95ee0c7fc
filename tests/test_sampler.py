"""The batch sampler against plain references: Python-sorted top-k/top-p/min-p, a loop for the
penalties, HF's RepetitionPenaltyLogitsProcessor, torch.argmax and log_softmax; plus seeded
reproducibility across batch mixes and a chi-square check of the draw frequencies."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from engine.config import SamplingParams
from engine.sampler import SampledToken, Sampler, SamplingRow, make_generator

CPU = torch.device("cpu")


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    **kwargs: object,
) -> SamplingRow:
    return SamplingRow(params or SamplingParams(), prompt or [0], output or [], **kwargs)


def sampled(**kwargs: object) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, **kwargs})


# ---------------------------------------------------------------------- reference implementations


def reference_kept(logits: list[float], p: SamplingParams, margin: float = 1e-4) -> set[int] | None:
    """The token ids temperature -> top-k -> top-p -> min-p keeps, in float64 Python with plain
    sorting, ties at a top-k or top-p boundary kept. None when a top-p or min-p boundary falls
    within `margin` of a cumulative mass or ratio, where float32 may legitimately disagree."""
    x = [v / p.temperature for v in logits]
    kept = set(range(len(x)))
    if 0 < p.top_k < len(x):
        kth = sorted(x, reverse=True)[p.top_k - 1]
        kept = {i for i in kept if x[i] >= kth}
    if p.top_p < 1.0:
        order = sorted(kept, key=lambda i: -x[i])
        z = sum(math.exp(x[i] - x[order[0]]) for i in order)
        cum, threshold = 0.0, x[order[-1]]
        for i in order:
            cum += math.exp(x[i] - x[order[0]]) / z
            if abs(cum - p.top_p) < margin:
                return None
            if cum >= p.top_p:
                threshold = x[i]
                break
        kept = {i for i in kept if x[i] >= threshold}
    if p.min_p > 0.0:
        best = max(x[i] for i in kept)
        ratio = {i: math.exp(x[i] - best) for i in kept}  # p_i / p_max
        if any(abs(r - p.min_p) < margin and r != 1.0 for r in ratio.values()):
            return None
        kept = {i for i in kept if ratio[i] >= p.min_p}
    return kept


def reference_penalties(
    logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]
) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(output):
        out[t] = out[t] * p.repetition_penalty if out[t] < 0 else out[t] / p.repetition_penalty
    for t, n in Counter(output).items():
        out[t] -= p.presence_penalty + p.frequency_penalty * n
    return out


# ---------------------------------------------------------------------- top-k / top-p / min-p


def check_against_reference(logits: torch.Tensor, params: list[SamplingParams]) -> int:
    """Asserts probabilities() keeps exactly the reference's tokens, with the reference's
    renormalized probabilities; returns how many rows were checked (not ambiguous)."""
    rows = [row(p) for p in params]
    probs = Sampler(CPU).probabilities(logits, rows)  # [num_rows, vocab]
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(rows)))
    checked = 0
    for r, p in enumerate(params):
        kept = reference_kept(logits[r].double().tolist(), p)
        if kept is None:
            continue
        checked += 1
        assert set(torch.nonzero(probs[r]).flatten().tolist()) == kept, (r, p)
        x = logits[r].double() / p.temperature
        ref = torch.zeros_like(x)
        ids = torch.tensor(sorted(kept))
        ref[ids] = torch.softmax(x[ids], dim=0)
        torch.testing.assert_close(probs[r].double(), ref, rtol=1e-4, atol=1e-6)
    return checked


def random_params(gen: torch.Generator, vocab: int, n: int) -> list[SamplingParams]:
    def pick(options: list[object]) -> object:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    return [
        sampled(
            temperature=pick([0.3, 0.7, 1.0, 1.5]),
            top_k=pick([0, 1, 2, 5, vocab - 1, vocab, vocab + 10]),
            top_p=pick([1.0, 0.9, 0.5, 0.3, 0.05]),
            min_p=pick([0.0, 0.0, 0.05, 0.2, 0.5]),
        )
        for _ in range(n)
    ]


def test_filters_match_reference_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 40
    logits = torch.randn(64, vocab, generator=gen) * 2.0  # [64, vocab]
    assert check_against_reference(logits, random_params(gen, vocab, 64)) >= 56


def test_filters_match_reference_with_ties() -> None:
    # Few distinct values: ties at the top-k, top-p and min-p boundaries are the common case.
    gen = torch.Generator().manual_seed(1)
    vocab = 24
    logits = torch.randint(-3, 4, (64, vocab), generator=gen).float() * 0.5  # [64, vocab]
    assert check_against_reference(logits, random_params(gen, vocab, 64)) >= 56


def test_ties_at_the_boundary_are_kept() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]] * 4)
    # p(3.0) = 0.437, p(2.0) = 0.161 each.
    params = [sampled(top_k=2), sampled(top_p=0.5), sampled(top_p=0.4), sampled(top_k=1)]
    probs = Sampler(CPU).probabilities(logits, [row(p) for p in params])
    assert (probs > 0).tolist() == [
        [True, False, True, True, True, False],  # 2nd largest is 2.0: all three 2.0s stay
        [True, False, True, True, True, False],  # 0.437 + one 2.0 reaches 0.5: its ties stay
        [True, False, False, False, False, False],  # 0.437 >= 0.4 alone
        [True, False, False, False, False, False],
    ]
    # With the top token tied, top_k=1 keeps both.
    tied = Sampler(CPU).probabilities(torch.tensor([[1.0, 5.0, 0.0, 5.0]]), [row(sampled(top_k=1))])
    assert tied.tolist() == [[0.0, 0.5, 0.0, 0.5]]


def test_filter_edge_cases() -> None:
    # A token 40 nats down has probability ~1e-18 and must survive top_p=1 and a huge top_k.
    logits = torch.tensor([[5.0, 4.0, -35.0, 4.0, 0.0]] * 4)
    params = [
        sampled(top_p=1.0),
        sampled(top_k=1000),
        sampled(min_p=1.0),
        sampled(top_k=5, top_p=1.0, min_p=0.0),
    ]
    probs = Sampler(CPU).probabilities(logits, [row(p) for p in params])
    assert (probs[[0, 1, 3]] > 0).all()
    assert probs[2].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # min_p=1: only the max
    # min_p=1 with the max tied keeps the tie, evenly.
    tied = Sampler(CPU).probabilities(torch.tensor([[2.0, 7.0, 7.0]]), [row(sampled(min_p=1.0))])
    assert tied.tolist() == [[0.0, 0.5, 0.5]]
    # A tiny top_p keeps just the argmax.
    tiny = Sampler(CPU).probabilities(logits[:1], [row(sampled(top_p=1e-6))])
    assert tiny.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]
    check_against_reference(logits, params)


def test_temperature_comes_before_top_p_and_min_p() -> None:
    # p(top) at T=1 is 0.73 >= 0.7, so top_p=0.7 keeps one token; at T=4 it is 0.56, so two.
    logits = torch.tensor([[2.0, 1.0, -10.0]] * 2)
    params = [sampled(temperature=1.0, top_p=0.7), sampled(temperature=4.0, top_p=0.7)]
    probs = Sampler(CPU).probabilities(logits, [row(p) for p in params])
    assert (probs > 0).sum(-1).tolist() == [1, 2]


def test_greedy_rows_are_one_hot_in_probabilities() -> None:
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [0.0, 3.0, 3.0, 1.0]])
    probs = Sampler(CPU).probabilities(logits, [row(), row(sampled())])
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]  # tie -> lowest id, like torch.argmax
    assert (probs[1] > 0).all()


# ---------------------------------------------------------------------- penalties


def test_penalties_match_reference_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    vocab = 30
    logits = torch.randn(8, vocab, generator=gen) * 3  # [8, vocab]
    logits[:, 0] = 0.0  # a zero logit: HF divides it (stays 0)
    cases = [
        (SamplingParams(repetition_penalty=1.3), [1, 2, 2, 0, 29], [3, 3, 3]),
        (SamplingParams(repetition_penalty=0.7), [4, 5], [5, 6]),
        (SamplingParams(presence_penalty=0.8), [7], [8, 8, 9]),
        (SamplingParams(frequency_penalty=0.5), [7], [8, 8, 9, 8]),
        (SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.3), [], [1, 1]),
        (
            SamplingParams(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.2),
            [10, 11, 12, 10],
            [12, 13, 13],
        ),
        (SamplingParams(), [1, 2, 3], [4, 5]),  # untouched
        (SamplingParams(repetition_penalty=2.0), [], []),  # nothing seen: untouched
    ]
    rows = [row(p, prompt, output) for p, prompt, output in cases]
    processed = Sampler(CPU).process_logits(logits, rows)  # [8, vocab]
    for r, (p, prompt, output) in enumerate(cases):
        ref = reference_penalties(logits[r].tolist(), p, prompt, output)
        torch.testing.assert_close(processed[r], torch.tensor(ref), rtol=1e-6, atol=1e-6)
    assert torch.equal(processed[6], logits[6])
    assert torch.equal(processed[7], logits[7])


def test_repetition_penalty_equals_hf_processor() -> None:
    gen = torch.Generator().manual_seed(3)
    vocab = 50
    logits = torch.randn(4, vocab, generator=gen) * 4  # [4, vocab]
    penalties = [1.2, 0.8, 1.0, 3.0]
    ids = torch.randint(vocab, (4, 12), generator=gen)  # [4, 12], with duplicates
    rows = [
        row(SamplingParams(repetition_penalty=pen), ids[r, :7].tolist(), ids[r, 7:].tolist())
        for r, pen in enumerate(penalties)
    ]
    processed = Sampler(CPU).process_logits(logits, rows)
    for r, pen in enumerate(penalties):
        hf_processor = RepetitionPenaltyLogitsProcessor(penalty=pen)
        hf = hf_processor(ids[r : r + 1], logits[r : r + 1].clone())
        assert torch.equal(processed[r], hf[0]), r


def test_process_logits_does_not_modify_its_input() -> None:
    logits = torch.randn(2, 10)
    before = logits.clone()
    rows = [
        row(SamplingParams(repetition_penalty=1.5, min_tokens=3), [1, 2], [3], eos_token_ids=[4]),
        row(SamplingParams(frequency_penalty=1.0), [1], [5, 5]),
    ]
    out = Sampler(CPU).process_logits(logits, rows)
    assert torch.equal(logits, before)
    assert not torch.equal(out, logits)


def test_bfloat16_logits_are_processed_in_float32() -> None:
    logits = torch.randn(3, 20).to(torch.bfloat16)
    rows = [row(), row(SamplingParams(repetition_penalty=1.1), [1, 2]), row()]
    assert Sampler(CPU).process_logits(logits, rows).dtype == torch.float32


# ---------------------------------------------------------------------- greedy, bans, logprobs


def test_greedy_equals_torch_argmax() -> None:
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        # Coarse values in half precision: many ties, which must go to the lowest id.
        logits = (torch.randn(16, 64, generator=gen) * 2).round().to(dtype)  # [16, 64]
        out = Sampler(CPU)(logits, [row() for _ in range(16)])
        assert [t.token_id for t in out] == torch.argmax(logits, dim=-1).tolist()
        assert all(t.logprob is None and t.top_logprobs is None for t in out)


def test_greedy_rows_unaffected_by_sampled_rows_in_the_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 32, generator=gen)  # [6, 32]
    rows = [row() if i % 2 == 0 else row(sampled(top_k=5)) for i in range(6)]
    out = Sampler(CPU)(logits, rows)
    assert [out[i].token_id for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()


def test_greedy_with_penalty_is_argmax_of_processed_logits() -> None:
    logits = torch.tensor([[1.0, 5.0, 4.5, -1.0]])
    p = SamplingParams(repetition_penalty=1.2)
    # 5.0 / 1.2 = 4.17 < 4.5: the penalty moves the argmax from 1 to 2.
    assert Sampler(CPU)(logits, [row(p, [1])])[0].token_id == 2


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 7.0]] * 4)  # eos = 2, stop id 3
    params = SamplingParams(min_tokens=2, stop_token_ids=[3])
    ignore = SamplingParams(min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    rows = [
        row(params, output=[]),
        row(params, output=[1]),
        row(params, output=[1, 1]),
        row(ignore, output=[1]),
    ]
    for r in rows:
        r.eos_token_ids = [2]
    out = Sampler(CPU)(logits, rows)
    # Below min_tokens: eos and the stop id are banned; reached: free; ignore_eos lifts only the
    # eos ban (eos then no longer stops anything).
    assert [t.token_id for t in out] == [4, 4, 2, 2]
    processed = Sampler(CPU).process_logits(logits, rows)
    assert torch.isneginf(processed[0, [2, 3]]).all() and torch.isneginf(processed[3, 3])
    # A banned id past the logits' vocab is ignored, not an index error.
    far = row(SamplingParams(min_tokens=1, stop_token_ids=[99]), eos_token_ids=[2])
    assert Sampler(CPU)(logits[:1], [far])[0].token_id == 3


def test_allowed_token_mask_restricts_every_row_kind() -> None:
    logits = torch.tensor([[9.0, 1.0, 2.0, 3.0]] * 3)
    mask = torch.tensor([False, True, True, False])
    rows = [
        row(allowed_token_mask=mask),
        row(sampled(), allowed_token_mask=mask),
        row(sampled(top_k=1)),
    ]
    for _ in range(20):
        out = Sampler(CPU)(logits, rows)
        assert out[0].token_id == 2 and out[1].token_id in (1, 2) and out[2].token_id == 0


def test_logprobs_are_raw_log_softmax_with_top_n_best_first() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 40, generator=gen) * 2  # [4, 40]
    rows = [
        row(SamplingParams(logprobs=5)),
        row(sampled(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=3), [1, 2, 3]),
        row(SamplingParams(logprobs=0)),
        row(sampled()),
    ]
    out = Sampler(CPU)(logits, rows)
    ref = torch.log_softmax(logits.double(), dim=-1)  # [4, 40]
    for r, n in ((0, 5), (1, 3)):
        assert out[r].logprob == pytest.approx(ref[r, out[r].token_id].item(), abs=1e-5)
        top = out[r].top_logprobs
        assert top is not None and len(top) == n
        assert [t for t, _ in top] == ref[r].argsort(descending=True)[:n].tolist()
        best = ref[r].sort(descending=True).values[:n].tolist()
        assert [v for _, v in top] == pytest.approx(best, abs=1e-5)
    assert out[2].logprob == pytest.approx(ref[2].max().item(), abs=1e-5)
    assert out[2].top_logprobs is None
    assert out[3] == SampledToken(out[3].token_id, None, None)


def test_fully_masked_row_raises_value_error() -> None:
    logits = torch.randn(3, 6)
    nothing = torch.zeros(6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"row 1: allowed_token_mask"):
        Sampler(CPU)(logits, [row(), row(sampled(), allowed_token_mask=nothing), row()])
    with pytest.raises(ValueError, match=r"row 0: allowed_token_mask"):
        Sampler(CPU)(logits[:1], [row(allowed_token_mask=nothing)])
    # Only eos is allowed, and min_tokens bans it: both reasons are named.
    only_eos = torch.tensor([False, False, True, False, False, False])
    banned = row(SamplingParams(min_tokens=1), allowed_token_mask=only_eos, eos_token_ids=[2])
    with pytest.raises(ValueError, match=r"row 0: min_tokens=1 .* and allowed_token_mask"):
        Sampler(CPU)(logits[:1], [banned])
    with pytest.raises(ValueError, match="every token is masked out"):
        Sampler(CPU).process_logits(logits[:1], [banned])


# ---------------------------------------------------------------------- seeds and frequencies


def run_steps(
    rows_per_step: list[list[SamplingRow]],
    logits_per_step: list[torch.Tensor],
    position: int,
    sampler: Sampler,
) -> list[int]:
    """Runs the steps and returns the tokens of the row at `position`, feeding them back."""
    tokens = []
    for rows, logits in zip(rows_per_step, logits_per_step, strict=True):
        out = sampler(logits, rows)
        tokens.append(out[position].token_id)
        rows[position].output_token_ids = list(tokens)
    return tokens


def seeded_tokens(seed: int, batch: int, position: int, steps: int = 20) -> list[int]:
    vocab = 50
    target = torch.Generator().manual_seed(100)  # the seeded row's logits: the same in every mix
    others = torch.Generator().manual_seed(200 + batch * 10 + position)  # the rest: differ per mix
    params = sampled(temperature=1.3, top_k=30, top_p=0.95, presence_penalty=0.3)
    generator = make_generator(seed, CPU)
    tracked = row(params, [1, 2, 3])
    tracked.generator = generator
    kinds = [sampled(), SamplingParams(), sampled(temperature=0.5, min_p=0.1)]
    steps_rows, steps_logits = [], []
    for step in range(steps):
        rows = []
        for i in range(batch):
            if i == position:
                rows.append(tracked)
                continue
            other = row(kinds[i % 3], [4], [])
            if i % 2 == 1:  # some neighbours seeded, some on the shared generator
                other.generator = make_generator(1000 + step * batch + i, CPU)
            rows.append(other)
        logits = torch.randn(batch, vocab, generator=others) * 2  # [batch, vocab]
        logits[position] = torch.randn(vocab, generator=target) * 2
        steps_rows.append(rows)
        steps_logits.append(logits)
    return run_steps(steps_rows, steps_logits, position, Sampler(CPU, seed=batch + position))


def test_seeded_row_is_reproducible_in_any_batch_position() -> None:
    alone = seeded_tokens(seed=1234, batch=1, position=0)
    assert len(set(alone)) > 5  # actually sampling, not stuck on one token
    assert seeded_tokens(seed=1234, batch=5, position=0) == alone
    assert seeded_tokens(seed=1234, batch=5, position=3) == alone
    assert seeded_tokens(seed=1234, batch=8, position=7) == alone
    assert seeded_tokens(seed=1235, batch=1, position=0) != alone
    assert seeded_tokens(seed=99, batch=5, position=3) != alone


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.randn(4, 100)
    rows = [row(sampled()) for _ in range(4)]
    draws = [[t.token_id for t in Sampler(CPU, seed=s)(logits, rows)] for s in (7, 7, 8)]
    assert draws[0] == draws[1]
    many = [tuple(t.token_id for t in Sampler(CPU, seed=s)(logits, rows)) for s in range(10)]
    assert len(set(many)) > 1


def test_greedy_rows_consume_no_random_numbers() -> None:
    generator = make_generator(5, CPU)
    state = generator.get_state()
    Sampler(CPU)(torch.randn(2, 10), [row(generator=generator), row()])
    assert torch.equal(generator.get_state(), state)


# Chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def chi_square(counts: Counter[int], probs: list[float], n: int) -> float:
    return sum((counts[t] - n * p) ** 2 / (n * p) for t, p in enumerate(probs) if p > 0)


@pytest.mark.parametrize(
    "params",
    [
        sampled(temperature=0.8),
        sampled(temperature=1.2, top_k=4),
        sampled(top_p=0.8, min_p=0.05),
    ],
)
def test_draw_frequencies_follow_probabilities(params: SamplingParams) -> None:
    logits = torch.tensor([[1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -3.0]])
    sampler = Sampler(CPU, seed=11)
    probs = sampler.probabilities(logits, [row(params)])[0].tolist()
    support = [p for p in probs if p > 0]
    assert len(support) >= 3

    # Seeded: one draw from each of n seeds (a batch of n seeded rows, each its own generator).
    n = 4000
    rows = [row(params, generator=make_generator(seed, CPU)) for seed in range(n)]
    seeded = Counter(t.token_id for t in sampler(logits.expand(n, -1), rows))
    # Shared generator: n unseeded rows in one batch.
    shared = Counter(t.token_id for t in sampler(logits.expand(n, -1), [row(params)] * n))
    for counts in (seeded, shared):
        assert all(probs[t] > 0 for t in counts)  # never a filtered-out token
        assert chi_square(counts, probs, n) < CHI2_999[len(support) - 1]


def test_draw_takes_unnormalized_probabilities_and_skips_zeros() -> None:
    probs = torch.tensor([[0.0, 3.0, 0.0, 1.0]] * 2000)  # [2000, 4]
    counts = Counter(Sampler(CPU, seed=3).draw(probs, [row(sampled())] * 2000).tolist())
    assert set(counts) == {1, 3}
    assert chi_square(counts, [0.0, 0.75, 0.0, 0.25], 2000) < CHI2_999[1]
