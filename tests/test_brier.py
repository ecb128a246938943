"""BrierLM estimators (calm-spec 3, 7.5) against toy models whose Brier-n is known by enumeration."""
from __future__ import annotations

import itertools
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from calm_megatron.metrics.brier import (
    BrierAccumulator,
    ar_brier,
    calm_brier_rollout,
    calm_brier_teacher_forced,
    chunk_sampler_from_hidden,
)

MAX_N = 4


def exact_brier_from_outcomes(outcomes: torch.Tensor, probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Brier-n = 2 P(y_{1..n}) - sum_x P(x_{1..n})^2, n = 1..4, for an enumerated distribution.

    ``outcomes`` [S, L >= 4] token sequences with probabilities ``probs`` [S] (summing to 1), ``target`` [L].
    """
    values = []
    for n in range(1, MAX_N + 1):
        prefixes, group = outcomes[:, :n].unique(dim=0, return_inverse=True)
        prefix_probs = torch.zeros(len(prefixes), dtype=torch.float64).scatter_add_(0, group, probs)
        accuracy = probs[(outcomes[:, :n] == target[:n]).all(-1)].sum()
        values.append(2 * accuracy - prefix_probs.square().sum())
    return torch.stack(values)


def assert_unbiased(per_repeat: torch.Tensor, exact: torch.Tensor, label: str) -> None:
    """Mean over repeats within 3 standard errors (plus float slack) of the exact value, for every n."""
    mean = per_repeat.mean(0)
    standard_error = per_repeat.std(0) / math.sqrt(per_repeat.shape[0])
    for n in range(MAX_N):
        print(f"{label} Brier-{n + 1}: exact {exact[n]:+.5f}, estimate {mean[n]:+.5f} "
              f"(se {standard_error[n]:.5f})")
    assert torch.all((mean - exact).abs() <= 3 * standard_error + 1e-5), (mean, exact, standard_error)


# ---------------------------------------------------------------- CALM, K >= 4 (teacher-forced)
def make_chunk_categoricals(num_positions: int, support: int, chunk_size: int, seed: int):
    """Per position, a categorical over ``support`` binary chunks (shared prefixes are common)."""
    generator = torch.Generator().manual_seed(seed)
    chunks = torch.randint(0, 2, (num_positions, support, chunk_size), generator=generator)
    probs = torch.softmax(1.5 * torch.randn(num_positions, support, generator=generator, dtype=torch.float64), -1)
    pick = torch.randint(0, support, (num_positions,), generator=generator)
    target = chunks[torch.arange(num_positions), pick].clone()
    target[::3] = torch.randint(0, 2, (len(target[::3]), chunk_size), generator=generator)  # some off-support
    return chunks, probs, target


@pytest.mark.parametrize("chunk_size", [4, 5])
def test_calm_teacher_forced_estimator_is_unbiased(chunk_size):
    num_positions, repeats = 12, 4000
    chunks, probs, target = make_chunk_categoricals(num_positions, 6, chunk_size, seed=chunk_size)
    exact = torch.stack([exact_brier_from_outcomes(chunks[p], probs[p], target[p])
                         for p in range(num_positions)]).mean(0)
    generator = torch.Generator().manual_seed(100 + chunk_size)

    def draw() -> torch.Tensor:  # [repeats, P, K]
        choice = torch.multinomial(probs, repeats, replacement=True, generator=generator).T
        return chunks[torch.arange(num_positions), choice]

    pred_a, pred_b = draw(), draw()
    acc = BrierAccumulator()
    estimates = calm_brier_teacher_forced(pred_a, pred_b, target.expand_as(pred_a), acc)
    assert_unbiased(estimates.mean(1), exact, f"CALM K={chunk_size}")
    assert acc.counts.tolist() == [repeats * num_positions] * MAX_N
    result = acc.result()
    assert [result[f"brier_{n}"] for n in range(1, 5)] == pytest.approx(estimates.mean((0, 1)).tolist())


# ---------------------------------------------------------------- CALM, K < 4 (rollout)
class MarkovChunkToy:
    """Next chunk ~ categorical(M[context_len % 2, last chunk]) over all vocab**K chunks."""

    def __init__(self, vocab: int, chunk_size: int, seed: int):
        self.vocab, self.chunk_size = vocab, chunk_size
        num_states = vocab ** chunk_size
        generator = torch.Generator().manual_seed(seed)
        logits = 1.5 * torch.randn(2, num_states, num_states, generator=generator, dtype=torch.float64)
        self.transition = torch.softmax(logits, -1)
        self.all_chunks = torch.tensor(list(itertools.product(range(vocab), repeat=chunk_size)))
        self.generator = torch.Generator().manual_seed(seed + 1)

    def state(self, chunk: torch.Tensor) -> torch.Tensor:
        weights = self.vocab ** torch.arange(self.chunk_size - 1, -1, -1)
        return (chunk * weights).sum(-1)

    def sample_next_chunks(self, chunks, context_len, num_samples):
        assert torch.all(context_len >= 1) and torch.all(context_len < chunks.shape[1])
        last = chunks[torch.arange(chunks.shape[0]), context_len - 1]
        probs = self.transition[context_len % 2, self.state(last)]
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=self.generator)
        return self.all_chunks[draws]

    def exact_brier(self, chunks: torch.Tensor, position: int, span: int) -> torch.Tensor:
        """Exact Brier-n at chunk position ``position`` of one row [C, K] by enumerating ``span`` chunks."""
        paths = torch.tensor(list(itertools.product(range(len(self.all_chunks)), repeat=span)))
        probs = torch.ones(len(paths), dtype=torch.float64)
        previous = self.state(chunks[position]).expand(len(paths))
        for step in range(span):
            probs = probs * self.transition[(position + 1 + step) % 2, previous, paths[:, step]]
            previous = paths[:, step]
        outcomes = self.all_chunks[paths].reshape(len(paths), -1)
        target = chunks[position + 1: position + 1 + span].reshape(-1)
        return exact_brier_from_outcomes(outcomes, probs, target)


def teacher_forced_pair(toy: MarkovChunkToy, chunks: torch.Tensor):
    """Two independent samples of chunk c+1 given chunks[:, :c+1], for every c: each [B, C-1, K]."""
    batch, num_chunks, chunk_size = chunks.shape
    context = chunks.repeat_interleave(num_chunks - 1, dim=0)
    context_len = torch.arange(1, num_chunks).repeat(batch)
    samples = toy.sample_next_chunks(context, context_len, 2).view(batch, num_chunks - 1, 2, chunk_size)
    return samples[:, :, 0], samples[:, :, 1]


@pytest.mark.parametrize("vocab,chunk_size", [(2, 1), (3, 2), (2, 3)])
def test_calm_rollout_estimator_is_unbiased(vocab, chunk_size):
    toy = MarkovChunkToy(vocab, chunk_size, seed=10 * vocab + chunk_size)
    generator = torch.Generator().manual_seed(7)
    rows, num_chunks, repeats = 2, 8, 3000
    span = math.ceil(MAX_N / chunk_size)
    chunks = torch.randint(0, vocab, (rows, num_chunks, chunk_size), generator=generator)
    exact = torch.stack([toy.exact_brier(chunks[b], c, span)
                         for b in range(rows) for c in range(num_chunks - span)]).mean(0)
    repeated = chunks.repeat(repeats, 1, 1)
    pred_a, pred_b = teacher_forced_pair(toy, repeated)
    acc = BrierAccumulator()
    estimates = calm_brier_rollout(toy.sample_next_chunks, repeated, pred_a, pred_b, acc)
    assert estimates.shape == (rows * repeats, num_chunks - span, MAX_N)
    per_repeat = estimates.view(repeats, rows, -1, MAX_N).mean((1, 2))
    assert_unbiased(per_repeat, exact, f"CALM rollout V={vocab} K={chunk_size}")
    assert acc.counts.tolist() == [rows * repeats * (num_chunks - span)] * MAX_N


def test_calm_rollout_without_rollouts_equals_teacher_forced():
    toy = MarkovChunkToy(2, 4, seed=3)
    chunks = torch.randint(0, 2, (3, 6, 4), generator=torch.Generator().manual_seed(4))
    pred_a, pred_b = teacher_forced_pair(toy, chunks)
    calls = []
    rollout = calm_brier_rollout(lambda *args: calls.append(args), chunks, pred_a, pred_b, BrierAccumulator())
    forced = calm_brier_teacher_forced(pred_a, pred_b, chunks[:, 1:], BrierAccumulator())
    assert not calls and torch.equal(rollout, forced)


def test_calm_rollout_samples_only_where_the_two_paths_agree():
    toy = MarkovChunkToy(2, 1, seed=6)
    chunks = torch.randint(0, 2, (64, 9, 1), generator=torch.Generator().manual_seed(2))
    pred_a, pred_b = teacher_forced_pair(toy, chunks)
    queries = []

    def recording_sampler(context, context_len, num_samples):
        queries.append((context.clone(), context_len.clone()))
        return toy.sample_next_chunks(context, context_len, num_samples)

    calm_brier_rollout(recording_sampler, chunks, pred_a, pred_b, BrierAccumulator())
    num_positions = 9 - MAX_N
    agree_first = (pred_a[:, :num_positions] == pred_b[:, :num_positions]).all(-1)
    assert len(queries) == MAX_N - 1 and len(queries[0][1]) == int(agree_first.sum())
    assert len(queries[0][1]) > len(queries[1][1]) > len(queries[2][1]) > 0
    # The first rollout context is the true prefix followed by x1's first chunk.
    rows, starts = agree_first.nonzero(as_tuple=True)
    context, context_len = queries[0]
    assert torch.equal(context_len, starts + 2)
    assert torch.equal(context[torch.arange(len(rows)), starts + 1], pred_a[rows, starts])
    assert torch.equal(context[torch.arange(len(rows)), starts], chunks[rows, starts])


def test_chunk_sampler_from_hidden_reads_the_last_context_position():
    chunks = torch.arange(5 * 6 * 2).view(5, 6, 2)
    context_len = torch.tensor([1, 3, 5, 2, 4])
    seen_lengths = []

    def hidden_fn(x):
        seen_lengths.append(x.shape[1])
        return x.float() * 10  # h[:, c] encodes chunk c

    def sample_chunks(h, num_samples):  # head "samples": the encoded chunk + 1, num_samples times
        return (h / 10).long().add(1).expand(num_samples, -1, -1)

    samples = chunk_sampler_from_hidden(hidden_fn, sample_chunks)(chunks, context_len, 3)
    assert samples.shape == (5, 3, 2) and seen_lengths == [5]
    expected = chunks[torch.arange(5), context_len - 1] + 1
    assert torch.equal(samples, expected[:, None].expand(-1, 3, -1))


# ---------------------------------------------------------------- AR baseline (Rao-Blackwellised)
class SecondOrderTokenToy:
    """logits[t] = table[token[t-1], token[t]] + bias[t % 2]: depends on two tokens and on position."""

    def __init__(self, vocab: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.table = 1.5 * torch.randn(vocab, vocab, vocab, generator=generator)
        self.bias = torch.randn(2, vocab, generator=generator)
        self.calls = []

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(tokens.shape))
        previous = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
        return self.table[previous, tokens] + self.bias[torch.arange(tokens.shape[1]) % 2]

    def exact_brier(self, row: torch.Tensor, position: int) -> torch.Tensor:
        """Enumerate every 4-token continuation of row[:position+1]; probabilities from the toy itself."""
        continuations = torch.tensor(list(itertools.product(range(self.vocab), repeat=MAX_N)))
        sequences = torch.cat([row[: position + 1].expand(len(continuations), -1), continuations], 1)
        log_probs = torch.log_softmax(self.logits(sequences).double(), -1)
        steps = torch.arange(position, position + MAX_N)
        path_log_prob = log_probs[:, steps].gather(-1, continuations[..., None]).squeeze(-1).sum(-1)
        target = row[position + 1: position + 1 + MAX_N]
        return exact_brier_from_outcomes(continuations, path_log_prob.exp(), target)


def test_ar_rao_blackwellised_estimator_is_unbiased():
    toy = SecondOrderTokenToy(vocab=5, seed=2)
    rows, length, repeats = 2, 10, 3000
    tokens = torch.randint(0, 5, (rows, length), generator=torch.Generator().manual_seed(9))
    exact = torch.stack([toy.exact_brier(tokens[b], i)
                         for b in range(rows) for i in range(length - MAX_N)]).mean(0)
    toy.calls.clear()
    acc = BrierAccumulator()
    estimates = ar_brier(toy.logits, tokens.repeat(repeats, 1), acc, generator=torch.Generator().manual_seed(8))
    assert estimates.shape == (rows * repeats, length - MAX_N, MAX_N)
    per_repeat = estimates.view(repeats, rows, -1, MAX_N).mean((1, 2))
    assert_unbiased(per_repeat, exact, "AR")
    assert per_repeat[:, 0].std() < 1e-6  # n = 1 is exact: no sampling enters Brier-1
    # One teacher-forced pass plus one batched rollout pass per extra token, each only for agreeing rows.
    assert len(toy.calls) == MAX_N and toy.calls[0] == (rows * repeats, length)
    assert toy.calls[1][0] > toy.calls[2][0] > toy.calls[3][0]
    assert acc.counts.tolist() == [rows * repeats * (length - MAX_N)] * MAX_N


def test_ar_rollout_micro_batches_give_the_same_estimates():
    toy = SecondOrderTokenToy(vocab=3, seed=5)
    tokens = torch.randint(0, 3, (4, 9), generator=torch.Generator().manual_seed(1))
    whole = ar_brier(toy.logits, tokens, BrierAccumulator(), generator=torch.Generator().manual_seed(0))
    split = ar_brier(toy.logits, tokens, BrierAccumulator(), generator=torch.Generator().manual_seed(0),
                     rollout_batch_size=3, teacher_logits=toy.logits(tokens))
    assert torch.allclose(whole, split, atol=1e-6)


# ---------------------------------------------------------------- aggregation
def test_degenerate_model_scores_zero_not_100():
    # Two identical samples that never match the data: every Brier-n is -1; the unclamped
    # reference formula max(b1*b2*b3*b4, 0)**0.25 would give 1 (i.e. 100).
    target = torch.zeros(50, 4, dtype=torch.long)
    constant = torch.ones(50, 4, dtype=torch.long)
    acc = BrierAccumulator()
    calm_brier_teacher_forced(constant, constant, target, acc)
    result = acc.result()
    assert [result[f"brier_{n}"] for n in range(1, 5)] == [-1.0] * 4
    assert result["brierlm"] == 0.0


def test_brierlm_is_100_times_geometric_mean_of_clamped_components():
    acc = BrierAccumulator()
    acc.add(torch.tensor([[0.4, 0.2, 0.1, 0.05]]))
    assert acc.result()["brierlm"] == pytest.approx(100 * (0.4 * 0.2 * 0.1 * 0.05) ** 0.25)
    acc.add(torch.tensor([[0.4, 0.2, 0.1, -0.45]]))  # Brier-4 mean becomes -0.2 -> clamped to 0
    assert acc.result()["brier_4"] == pytest.approx(-0.2) and acc.result()["brierlm"] == 0.0
    assert math.isnan(BrierAccumulator().result()["brierlm"])


def test_merge_is_a_sum_of_sums_not_a_mean_of_means():
    first, second, pooled = BrierAccumulator(), BrierAccumulator(), BrierAccumulator()
    small = torch.full((2, 4), 0.9, dtype=torch.float64)
    large = torch.full((8, 4), 0.1, dtype=torch.float64)
    first.add(small), second.add(large), pooled.add(torch.cat([small, large]))
    merged = first.merge(second).result()
    assert merged == pytest.approx(pooled.result())
    assert merged["brier_1"] == pytest.approx((2 * 0.9 + 8 * 0.1) / 10)  # not (0.9 + 0.1) / 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_reduce_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        acc = BrierAccumulator()
        acc.add(torch.full((2 + 6 * rank, 4), 0.9 - 0.8 * rank, dtype=torch.float64))  # 2 x 0.9 | 8 x 0.1
        results[rank] = acc.all_reduce().result()
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_ranks():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_all_reduce_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    expected = (2 * 0.9 + 8 * 0.1) / 10
    for rank in (0, 1):
        assert results[rank]["brier_1"] == pytest.approx(expected)
        assert results[rank]["brierlm"] == pytest.approx(100 * expected)
