"""BrierLM: sample-based Brier-n estimators and their exact aggregation (calm-spec sections 3 and 7.5).

Brier(P, y) = 2 P(y) - sum_x P(x)^2. With two independent model samples x1, x2 the estimate
1{x1 = y} + 1{x2 = y} - 1{x1 = x2} is unbiased; Brier-n applies it to the next n tokens as one
outcome. BrierLM = 100 * (prod_{n=1..4} max(Brier-n, 0))^(1/4).

Three estimators feed one :class:`BrierAccumulator`:

* :func:`calm_brier_teacher_forced` - CALM with K >= 4: two teacher-forced chunk samples per
  chunk position, n-grams scored at chunk starts only.
* :func:`calm_brier_rollout` - CALM with K < 4: the accuracy term concatenates teacher-forced
  samples of consecutive chunks; the collision term rolls out extra chunks along sample x1's path
  (through a :data:`ChunkSampler` callable) while the two paths still agree.
* :func:`ar_brier` - the autoregressive baseline, Rao-Blackwellised: exact probabilities for the
  accuracy term, sum_x P(x)^2 for the collision term, rolled out along x1 while x1 and x2 agree.

Nothing here imports a model class: models enter as callables, so the estimators can be checked
against toy models whose Brier-n is known in closed form (tests/test_brier.py).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

BRIER_MAX_N = 4

ChunkSampler = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``sample_next_chunks(chunks, context_len, num_samples) -> LongTensor[Q, num_samples, K]``.

``chunks`` is LongTensor[Q, C, K] and ``context_len`` LongTensor[Q] with 1 <= context_len[q] <= C - 1.
Row q must hold ``num_samples`` independent model samples of the chunk that follows
``chunks[q, :context_len[q]]``. Chunks at index >= context_len[q] are filler and must not change the
result (true for any causal backbone; a KV-cached implementation may ignore them).
"""

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""``logits_fn(tokens LongTensor[B', T']) -> logits[B', T', V]`` of a causal LM (full recomputation)."""


class BrierAccumulator:
    """Exact running sums of Brier-n estimates for n = 1..4, reducible across data-parallel ranks.

    Sums and counts are kept separately (float64 / int64) so that merging ranks or eval batches is a
    sum of sums divided by a sum of counts, never a mean of means. Callers add exactly the positions
    they scored. Tensors live on ``device``; pass the GPU device to avoid host syncs per batch.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.sums = torch.zeros(BRIER_MAX_N, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(BRIER_MAX_N, dtype=torch.int64, device=self.device)

    def add(self, estimates: torch.Tensor) -> None:
        """Add per-position estimates ``[..., n_max]``: column j holds Brier-(j+1), n_max <= 4."""
        n_max = estimates.shape[-1]
        if not 1 <= n_max <= BRIER_MAX_N:
            raise ValueError(f"estimates must have 1..{BRIER_MAX_N} columns (one per n), got {n_max}")
        flat = estimates.detach().reshape(-1, n_max).to(self.device, torch.float64)
        self.sums[:n_max] += flat.sum(0)
        self.counts[:n_max] += flat.shape[0]

    def merge(self, other: "BrierAccumulator") -> "BrierAccumulator":
        """Add another accumulator's sums and counts into this one (in place); returns self."""
        self.sums += other.sums.to(self.device)
        self.counts += other.counts.to(self.device)
        return self

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> "BrierAccumulator":
        """Sum sums and counts over ``group`` (the data-parallel group) in place; returns self.

        Call once, after the last :meth:`add`; every rank then holds the global totals. Tensor-parallel
        peers see the same data and must not be in ``group``. A no-op without an initialised group.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if dist.get_backend(group) == "nccl":
            comm_device = torch.device("cuda", torch.cuda.current_device())
        else:
            comm_device = torch.device("cpu")
        # counts < 2**53 are exact in float64, so one packed all-reduce carries both.
        packed = torch.stack([self.sums, self.counts.to(torch.float64)]).to(comm_device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        packed = packed.to(self.device)
        self.sums = packed[0].clone()
        self.counts = packed[1].round().to(torch.int64)
        return self

    def reset(self) -> None:
        """Zero all sums and counts."""
        self.sums.zero_()
        self.counts.zero_()

    def result(self) -> Dict[str, float]:
        """``brier_1..brier_4`` (raw means, may be negative) and ``brierlm`` on the paper's 0-100 scale.

        Each Brier-n is clamped at 0 before the geometric mean (calm-spec 7.5): otherwise four negative
        components multiply to a positive product and a degenerate model scores highly. A Brier-n with no
        scored positions is NaN, and so is BrierLM then.
        """
        sums, counts = self.sums.cpu().tolist(), self.counts.cpu().tolist()
        components = [s / c if c > 0 else math.nan for s, c in zip(sums, counts)]
        out = {f"brier_{n + 1}": value for n, value in enumerate(components)}
        if any(math.isnan(value) for value in components):
            out["brierlm"] = math.nan
        else:
            product = math.prod(max(value, 0.0) for value in components)
            out["brierlm"] = 100.0 * product ** (1.0 / BRIER_MAX_N)
        return out


def _two_sample_estimates(match_a: torch.Tensor, match_b: torch.Tensor,
                          collide: torch.Tensor, max_n: int) -> torch.Tensor:
    """1{x1=y} + 1{x2=y} - 1{x1=x2} on the first n tokens, n = 1..max_n, from per-token matches [..., >=max_n]."""
    def prefix_match(token_matches: torch.Tensor) -> torch.Tensor:
        return token_matches[..., :max_n].to(torch.int64).cumprod(-1)

    return (prefix_match(match_a) + prefix_match(match_b) - prefix_match(collide)).to(torch.float64)


def calm_brier_teacher_forced(pred_a: torch.Tensor, pred_b: torch.Tensor, target: torch.Tensor,
                              acc: BrierAccumulator, max_n: int = BRIER_MAX_N) -> torch.Tensor:
    """CALM with K >= max_n: score the first n tokens of two predicted chunks against the true chunk.

    ``pred_a``, ``pred_b``: LongTensor[..., K], two independent teacher-forced samples (AE-decoded) of the
    chunk at each scored chunk position; ``target``: the true chunk there, same shape. Pass exactly the
    positions to score (every chunk position that has a true next chunk). Adds to ``acc`` and returns
    the estimates [..., max_n] (float64).
    """
    if not (pred_a.shape == pred_b.shape == target.shape):
        raise ValueError(f"shape mismatch: pred_a {tuple(pred_a.shape)}, pred_b {tuple(pred_b.shape)}, "
                         f"target {tuple(target.shape)}")
    if target.shape[-1] < max_n:
        raise ValueError(f"chunk size K={target.shape[-1]} < max_n={max_n}: use calm_brier_rollout")
    estimates = _two_sample_estimates(pred_a == target, pred_b == target, pred_a == pred_b, max_n)
    acc.add(estimates)
    return estimates


def _chunk_windows(chunks: torch.Tensor, num_chunks: int, num_positions: int) -> torch.Tensor:
    """[B, C', K] -> [B, num_positions, num_chunks * K]: chunks p..p+num_chunks-1 concatenated."""
    windows = chunks.unfold(1, num_chunks, 1)[:, :num_positions]  # [B, P, K, num_chunks]
    return windows.transpose(-1, -2).reshape(*windows.shape[:2], -1)


def calm_brier_rollout(sample_next_chunks: ChunkSampler, chunks: torch.Tensor, pred_a: torch.Tensor,
                       pred_b: torch.Tensor, acc: BrierAccumulator,
                       max_n: int = BRIER_MAX_N) -> torch.Tensor:
    """CALM with K < max_n: n-grams spanning several chunks, scored at chunk starts.

    ``chunks``: LongTensor[B, C, K], the true sequence in chunks. ``pred_a``/``pred_b``: LongTensor
    [B, C-1, K], two independent teacher-forced samples of chunk c+1 given chunks[:, :c+1].
    With m = ceil(max_n / K), the scored positions are c = 0..C-1-m (all n-gram targets inside the block).

    Accuracy: the samples at positions c..c+m-1 concatenated, compared with the true tokens (given the
    first chunk matches, the next teacher-forced sample is a sample along the true path, so this is an
    unbiased estimate of P(y_{1..n})). Collision: x1 = pred_a[:, c], x2 = pred_b[:, c]; while the two
    paths agree on whole chunks, ``sample_next_chunks`` draws two more chunks after x1's path. For
    K >= max_n (m = 1) this equals :func:`calm_brier_teacher_forced`. Returns estimates [B, P, max_n].
    """
    batch, num_chunks, chunk_size = chunks.shape
    if pred_a.shape != (batch, num_chunks - 1, chunk_size) or pred_b.shape != pred_a.shape:
        raise ValueError(f"pred_a/pred_b must be [B, C-1, K] = {[batch, num_chunks - 1, chunk_size]}, "
                         f"got {list(pred_a.shape)} and {list(pred_b.shape)}")
    span = math.ceil(max_n / chunk_size)
    num_positions = num_chunks - span
    if num_positions <= 0:
        raise ValueError(f"{num_chunks} chunks of K={chunk_size} leave no position with {max_n} target tokens")
    target = _chunk_windows(chunks[:, 1:], span, num_positions)
    path_a = _chunk_windows(pred_a, span, num_positions)
    path_b = _chunk_windows(pred_b, span, num_positions)
    collide = _collision_rollout(sample_next_chunks, chunks, pred_a[:, :num_positions],
                                 pred_b[:, :num_positions], span)
    estimates = _two_sample_estimates(path_a == target, path_b == target, collide, max_n)
    acc.add(estimates)
    return estimates


def _collision_rollout(sample_next_chunks: ChunkSampler, chunks: torch.Tensor, first_a: torch.Tensor,
                       first_b: torch.Tensor, span: int) -> torch.Tensor:
    """Per-token agreement [B, P, span*K] of two sampled paths rolled out along x1; False after divergence."""
    batch, num_positions, chunk_size = first_a.shape
    path = first_a.reshape(batch * num_positions, 1, chunk_size)
    agree = torch.zeros(batch * num_positions, span * chunk_size, dtype=torch.bool, device=chunks.device)
    agree[:, :chunk_size] = (first_a == first_b).reshape(-1, chunk_size)
    rows = torch.arange(batch, device=chunks.device).repeat_interleave(num_positions)
    starts = torch.arange(num_positions, device=chunks.device).repeat(batch)
    alive = agree[:, :chunk_size].all(-1).nonzero().squeeze(1)  # queries whose paths still agree
    for step in range(1, span):
        if alive.numel() == 0:
            break
        # Context: true chunks 0..c, then x1's chunks; it predicts chunk c + 1 + step.
        context = chunks[rows[alive]].clone()
        chunk_index = starts[alive, None] + 1 + torch.arange(step, device=chunks.device)
        context.scatter_(1, chunk_index[..., None].expand(-1, -1, chunk_size), path[alive])
        samples = sample_next_chunks(context, starts[alive] + 1 + step, 2)
        if samples.shape != (alive.numel(), 2, chunk_size):
            raise ValueError(f"sample_next_chunks returned {list(samples.shape)}, "
                             f"expected {[alive.numel(), 2, chunk_size]}")
        next_path = torch.zeros(path.shape[0], 1, chunk_size, dtype=path.dtype, device=path.device)
        next_path[alive, 0] = samples[:, 0].to(path.dtype)
        path = torch.cat([path, next_path], dim=1)
        same = samples[:, 0] == samples[:, 1]
        agree[alive, step * chunk_size:(step + 1) * chunk_size] = same
        alive = alive[same.all(-1)]
    return agree.reshape(batch, num_positions, span * chunk_size)


def chunk_sampler_from_hidden(hidden_fn: Callable[[torch.Tensor], torch.Tensor],
                              sample_chunks: Callable[[torch.Tensor, int], torch.Tensor]) -> ChunkSampler:
    """Build a :data:`ChunkSampler` from a backbone and a head sampler, by full recomputation.

    ``hidden_fn(chunks [Q, C, K]) -> h [Q, C, D]``: the causal backbone, where h[:, c] conditions chunk
    c+1 on chunks 0..c. ``sample_chunks(h [Q, D], num_samples) -> LongTensor[num_samples, Q, K]``: head
    samples decoded to tokens. Chunks beyond the longest context are cut before the backbone runs.
    """
    def sample_next_chunks(chunks: torch.Tensor, context_len: torch.Tensor, num_samples: int) -> torch.Tensor:
        hidden = hidden_fn(chunks[:, : int(context_len.max())])
        last = hidden[torch.arange(chunks.shape[0], device=hidden.device), context_len.to(hidden.device) - 1]
        return sample_chunks(last, num_samples).transpose(0, 1)

    return sample_next_chunks


@torch.no_grad()
def ar_brier(logits_fn: LogitsFn, tokens: torch.Tensor, acc: BrierAccumulator,
             generator: Optional[torch.Generator] = None, max_n: int = BRIER_MAX_N, *,
             teacher_logits: Optional[torch.Tensor] = None,
             rollout_batch_size: Optional[int] = None) -> torch.Tensor:
    """Rao-Blackwellised Brier-n of an autoregressive LM at every position i < T - max_n.

    ``tokens``: LongTensor[B, T]; position i conditions on tokens[:, :i+1] and scores tokens i+1..i+n.
    Accuracy term 2 * prod_{j<=n} P(y_{i+j} | true prefix) from exact softmax probabilities (one
    teacher-forced pass; pass ``teacher_logits`` [B, T, V] to reuse logits already computed).
    Collision term 1{x1_{1..n-1} = x2_{1..n-1}} * sum_x P(x | prefix, x1_{1..n-1})^2 with x1, x2 drawn by
    multinomial at T = 1 (``generator`` must live on the logits' device); rollout step j recomputes
    logits only for the positions whose samples still agree, as one batch (or micro-batches of
    ``rollout_batch_size`` rows). Adds to ``acc`` and returns the estimates [B, T - max_n, max_n].
    """
    batch, length = tokens.shape
    num_positions = length - max_n
    if num_positions <= 0 or not 1 <= max_n <= BRIER_MAX_N:
        raise ValueError(f"need 1 <= max_n <= {BRIER_MAX_N} < T, got max_n={max_n}, T={length}")
    logits = teacher_logits if teacher_logits is not None else logits_fn(tokens)
    probs = torch.softmax(logits.float(), dim=-1)
    next_token_prob = probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # P(y_{t+1} | y_{<=t})
    windows = next_token_prob.unfold(1, max_n, 1)[:, :num_positions]  # [B, P, max_n]
    accuracy = 2.0 * windows.to(torch.float64).cumprod(-1)
    collision = _ar_collision(logits_fn, tokens, probs[:, :num_positions], max_n, generator,
                              rollout_batch_size)
    estimates = accuracy - collision
    acc.add(estimates)
    return estimates


def _ar_collision(logits_fn: LogitsFn, tokens: torch.Tensor, first_probs: torch.Tensor, max_n: int,
                  generator: Optional[torch.Generator], rollout_batch_size: Optional[int]) -> torch.Tensor:
    """Collision terms [B, P, max_n]: sum_x P(x | prefix, x1_{<j})^2 where x1, x2 agreed on the first j-1."""
    batch, num_positions, vocab = first_probs.shape
    device = tokens.device
    rows = torch.arange(batch, device=device).repeat_interleave(num_positions)
    starts = torch.arange(num_positions, device=device).repeat(batch)
    probs = first_probs.reshape(-1, vocab)
    collision = torch.zeros(batch * num_positions, max_n, dtype=torch.float64, device=device)
    collision[:, 0] = probs.to(torch.float64).square().sum(-1)
    path = torch.zeros(batch * num_positions, max_n - 1, dtype=tokens.dtype, device=device)
    alive = torch.arange(batch * num_positions, device=device)
    for step in range(1, max_n):
        draws = torch.multinomial(probs, 2, replacement=True, generator=generator)
        path[alive, step - 1] = draws[:, 0].to(tokens.dtype)
        alive = alive[draws[:, 0] == draws[:, 1]]
        if alive.numel() == 0:
            break
        probs = _rollout_probs(logits_fn, tokens, rows[alive], starts[alive], path[alive, :step],
                               rollout_batch_size)
        collision[alive, step] = probs.to(torch.float64).square().sum(-1)
    return collision.reshape(batch, num_positions, max_n)


def _rollout_probs(logits_fn: LogitsFn, tokens: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                   prefix: torch.Tensor, rollout_batch_size: Optional[int]) -> torch.Tensor:
    """Next-token probabilities after tokens[row, :start+1] followed by ``prefix`` [Q, j], shape [Q, V].

    Each query is the true row with x1's prefix spliced in after its start; the tokens after the splice
    are filler that a causal model ignores, so rows of different starts share one batch.
    """
    step = prefix.shape[1]
    read_at = starts + step
    chunk = rollout_batch_size or rows.numel()
    out = []
    for lo in range(0, rows.numel(), chunk):
        sl = slice(lo, lo + chunk)
        sequences = tokens[rows[sl], : int(read_at[sl].max()) + 1].clone()
        splice_at = starts[sl, None] + 1 + torch.arange(step, device=tokens.device)
        sequences.scatter_(1, splice_at, prefix[sl])
        logits = logits_fn(sequences)
        picked = logits[torch.arange(sequences.shape[0], device=logits.device), read_at[sl].to(logits.device)]
        out.append(torch.softmax(picked.float(), dim=-1))
    return torch.cat(out)
