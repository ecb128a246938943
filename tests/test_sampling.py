"""Likelihood-free temperature sampling (calm-spec 4) against a toy sampler whose P is known exactly."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from calm_megatron.sampling import (
    batch_approx_distribution,
    check_temperature,
    inverse_temperature_integer,
    sample_batch_approx,
    sample_exact,
    split_inverse_temperature,
)

# Eight outcomes, each a K=2 chunk; chunks share first tokens so equality must use the whole chunk.
TOY_P = torch.tensor([0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04], dtype=torch.float64)
TOY_CHUNKS = torch.tensor([[o // 3, o % 3] for o in range(len(TOY_P))])
NUM_DRAWS = 20_000


def outcome_of(chunks: torch.Tensor) -> torch.Tensor:
    """Invert TOY_CHUNKS: chunk [a, b] -> outcome 3a + b."""
    return chunks[..., 0] * 3 + chunks[..., 1]


def toy_sampler(seed: int):
    generator = torch.Generator().manual_seed(seed)

    def sampler(batch_indices: torch.Tensor) -> torch.Tensor:
        draws = torch.multinomial(TOY_P, batch_indices.numel(), replacement=True, generator=generator)
        return TOY_CHUNKS[draws]

    return sampler


def tempered(temperature: float) -> torch.Tensor:
    weights = TOY_P ** (1.0 / temperature)
    return weights / weights.sum()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; survival function via the regularised upper incomplete gamma."""
    expected = probs * counts.sum()
    assert expected.min() >= 5, "too few expected counts for a chi-square test"
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, statistic / 2))


def theorem2_expected_calls(temperature: float) -> float:
    whole, alpha = split_inverse_temperature(temperature)
    z_t = (TOY_P ** (1.0 / temperature)).sum()
    factory = (TOY_P ** (1.0 / temperature - 1.0)).sum() if alpha > 0 else 0.0
    return float((whole + factory) / z_t)


# ---------------------------------------------------------------- Algorithm 1
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.5, 0.4, 1 / 3])
def test_exact_sampling_matches_tempered_distribution_and_theorem2_cost(temperature):
    result = sample_exact(toy_sampler(seed=11), temperature, NUM_DRAWS,
                          generator=torch.Generator().manual_seed(12))
    assert result.chunks.shape == (NUM_DRAWS, 2) and not result.fell_back.any()
    counts = torch.bincount(outcome_of(result.chunks), minlength=len(TOY_P)).to(torch.float64)
    p_value = chi_square_p_value(counts, tempered(temperature))
    call_ratio = result.calls.double().mean().item() / theorem2_expected_calls(temperature)
    print(f"T={temperature:.4f}: chi-square p={p_value:.4f}, mean calls / Theorem 2 = {call_ratio:.4f}")
    assert p_value > 0.01
    assert abs(call_ratio - 1.0) < 0.05


def test_exact_sampling_at_t1_is_one_plain_draw_per_sequence():
    result = sample_exact(toy_sampler(seed=3), 1.0, 64)
    assert torch.equal(result.calls, torch.ones(64, dtype=torch.int64))


def test_exact_sampling_calls_the_sampler_only_for_running_sequences():
    seen = []
    inner = toy_sampler(seed=5)

    def recording_sampler(batch_indices):
        seen.append(batch_indices.clone())
        return inner(batch_indices)

    result = sample_exact(recording_sampler, 0.5, 200)
    calls_seen = torch.bincount(torch.cat(seen), minlength=200)
    assert torch.equal(calls_seen, result.calls)
    assert all(len(ids.unique()) == len(ids) for ids in seen)


def test_exact_sampling_call_cap_errors_clearly():
    with pytest.raises(RuntimeError, match=r"max_calls=3 .*T=0\.2"):
        sample_exact(toy_sampler(seed=7), 0.2, 100, max_calls=3)


def test_exact_sampling_call_cap_fallback_draws_plainly_and_warns():
    with pytest.warns(RuntimeWarning, match=r"fell back to a plain T=1 draw"):
        result = sample_exact(toy_sampler(seed=7), 0.2, 100, max_calls=5, on_cap="fallback")
    assert result.fell_back.any()
    assert torch.all(result.calls[result.fell_back] == 6)
    assert torch.all(result.calls[~result.fell_back] <= 5)
    assert torch.all(outcome_of(result.chunks) < len(TOY_P))


# ---------------------------------------------------------------- Algorithm 2
def letters_to_chunks(pool: str) -> torch.Tensor:
    """One row of 2-token chunks; letters 'A'.. map to chunks that share their first token in pairs."""
    return torch.tensor([[(ord(c) - 65) // 2, (ord(c) - 65) % 2] for c in pool])[None]


def test_batch_approx_worked_example_exact_weights():
    probs = batch_approx_distribution(letters_to_chunks("ACADBEAFBG"), 0.5)[0]
    # A first appears at slot 0, B at slot 4; every other slot carries no weight.
    expected = torch.zeros(10, dtype=torch.float64)
    expected[0], expected[4] = 0.75, 0.25
    assert torch.allclose(probs, expected, atol=1e-12, rtol=0)


def test_batch_approx_worked_example_empirical():
    candidates = letters_to_chunks("ACADBEAFBG").expand(NUM_DRAWS, -1, -1)
    chosen = sample_batch_approx(candidates, 0.5, generator=torch.Generator().manual_seed(21))
    a_chunk, b_chunk = letters_to_chunks("AB")[0]
    is_a, is_b = (chosen == a_chunk).all(-1), (chosen == b_chunk).all(-1)
    assert torch.all(is_a | is_b)
    counts = torch.tensor([is_a.sum(), is_b.sum()], dtype=torch.float64)
    p_value = chi_square_p_value(counts, torch.tensor([0.75, 0.25], dtype=torch.float64))
    print(f"worked example: P(A)={counts[0] / NUM_DRAWS:.4f}, chi-square p={p_value:.4f}")
    assert p_value > 0.01


def reference_selection(pool: list, whole: int) -> dict:
    """The paper's Algorithm 2 spelt out with a Counter (as in the reference code), exact weights."""
    counts = Counter(pool)
    for level in range(whole, 0, -1):
        weights = {x: math.comb(c, level) for x, c in counts.items() if c >= level}
        if weights:
            total = sum(weights.values())
            return {x: w / total for x, w in weights.items()}
    raise AssertionError("unreachable")


@pytest.mark.parametrize("temperature", [1 / 2, 1 / 3, 1 / 4])
def test_batch_approx_distribution_matches_counter_reference(temperature):
    generator = torch.Generator().manual_seed(31)
    for num in (1, 2, 5, 12, 40):
        idx = torch.multinomial(TOY_P, 50 * num, replacement=True, generator=generator).view(50, num)
        probs = batch_approx_distribution(TOY_CHUNKS[idx], temperature)
        for row in range(50):
            got = Counter()
            for slot, outcome in enumerate(idx[row].tolist()):
                got[outcome] += probs[row, slot].item()
            want = reference_selection(idx[row].tolist(), inverse_temperature_integer(temperature))
            assert set(k for k, v in got.items() if v > 0) == set(want)
            assert all(abs(got[k] - want[k]) < 1e-12 for k in want)


def batch_approx_output_distribution(num: int, temperature: float, pools: int, seed: int) -> torch.Tensor:
    """Algorithm 2's output distribution over outcomes, averaged over random pools of size ``num``."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(TOY_P, pools * num, replacement=True, generator=generator).view(pools, num)
    probs = batch_approx_distribution(TOY_CHUNKS[idx], temperature)
    return torch.zeros(pools, len(TOY_P), dtype=torch.float64).scatter_add_(1, idx, probs).mean(0)


@pytest.mark.parametrize("temperature", [1 / 2, 1 / 3])
def test_batch_approx_converges_as_pool_grows(temperature):
    target = tempered(temperature)
    distances = []
    for num in (10, 100, 1000):
        output = batch_approx_output_distribution(num, temperature, pools=2000, seed=41)
        distances.append(0.5 * (output - target).abs().sum().item())
    print(f"T={temperature:.4f}: TV over N=10,100,1000: " + ", ".join(f"{d:.4f}" for d in distances))
    assert distances[0] > distances[1] > distances[2]
    assert distances[2] < 0.01


def test_batch_approx_samples_follow_selection_probabilities():
    num, temperature = 10, 1 / 3
    generator = torch.Generator().manual_seed(51)
    idx = torch.multinomial(TOY_P, NUM_DRAWS * num, replacement=True, generator=generator).view(NUM_DRAWS, num)
    chosen = sample_batch_approx(TOY_CHUNKS[idx], temperature, generator=generator)
    counts = torch.bincount(outcome_of(chosen), minlength=len(TOY_P)).to(torch.float64)
    expected = batch_approx_output_distribution(num, temperature, pools=NUM_DRAWS, seed=52)
    p_value = chi_square_p_value(counts, expected)
    print(f"Algorithm 2 samples vs selection probabilities (N=10, T=1/3): chi-square p={p_value:.4f}")
    assert p_value > 0.01


def test_batch_approx_at_t1_returns_a_plain_draw():
    candidates = TOY_CHUNKS[torch.tensor([[3, 1, 1, 1], [0, 2, 2, 5]])]
    assert torch.equal(sample_batch_approx(candidates, 1.0), candidates[:, 0])


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("temperature", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_temperature_outside_unit_interval_is_rejected(temperature):
    for call in (lambda: check_temperature(temperature),
                 lambda: sample_exact(toy_sampler(seed=1), temperature, 4),
                 lambda: sample_batch_approx(TOY_CHUNKS[None, :3], temperature)):
        with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\], got"):
            call()


@pytest.mark.parametrize("temperature", [0.7, 0.4, 0.3])
def test_batch_approx_rejects_temperature_not_one_over_n(temperature):
    with pytest.raises(ValueError, match=r"T = 1/n"):
        sample_batch_approx(TOY_CHUNKS[None, :3], temperature)


def test_inverse_temperature_split():
    assert split_inverse_temperature(1.0) == (1, 0.0)
    assert split_inverse_temperature(1 / 3) == (3, 0.0)
    whole, alpha = split_inverse_temperature(0.4)
    assert whole == 2 and alpha == pytest.approx(0.5)
    assert [split_inverse_temperature(1 / n) for n in (2, 5, 6, 7)] == [(2, 0.0), (5, 0.0), (6, 0.0), (7, 0.0)]


def test_exact_sampling_rejects_bad_on_cap():
    with pytest.raises(ValueError, match="on_cap"):
        sample_exact(toy_sampler(seed=1), 0.5, 4, on_cap="ignore")
