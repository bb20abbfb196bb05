"""Length-grouped batching: same samples, less padding, deterministic, sharded per rank, resumable."""

from __future__ import annotations

import random

from minigpt4qwen.data.dataset import ResumableSampler, length_grouped


def _padding(order: list[int], lengths: list[int], batch: int) -> float:
    """Share of padded positions when `order` is cut into batches padded to their longest sample."""
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for i in order) / padded


def test_length_grouped_keeps_samples_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(96, 288) for _ in range(1000)]
    perm = list(range(1000))
    rng.shuffle(perm)
    grouped = length_grouped(perm, lengths, group=8, window=16, seed=1)
    assert sorted(grouped) == list(range(1000))
    assert _padding(perm, lengths, 8) > 0.2 and _padding(grouped, lengths, 8) < 0.05
    assert grouped == length_grouped(perm, lengths, 8, 16, seed=1)  # deterministic
    assert grouped != length_grouped(perm, lengths, 8, 16, seed=2)  # the seed shuffles the batch order
    # the first batch is the longest of the first window (an OOM shows at step 1), and windows stay local
    assert max(lengths[i] for i in grouped[:8]) == max(lengths[i] for i in perm[:128])
    assert set(grouped[:128]) == set(perm[:128])
    # a sample count that is not a multiple of the group: the short group must not shift later batches off their groups
    odd = length_grouped(perm[:997], lengths, group=8, window=200, seed=1)  # one window: a global sort
    assert sorted(odd) == sorted(perm[:997]) and _padding(odd, lengths, 8) < 0.05


def test_sampler_shards_groups_over_ranks_and_resumes():
    rng = random.Random(1)
    lengths = [rng.randint(10, 200) for _ in range(203)]
    ranks = [ResumableSampler(203, seed=3, rank=r, world_size=2, lengths=lengths, batch_size=4, window=4)
             for r in range(2)]
    plain = [ResumableSampler(203, seed=3, rank=r, world_size=2).order() for r in range(2)]
    orders = [s.order() for s in ranks]
    assert len(orders[0]) == len(orders[1]) == 101 and not set(orders[0]) & set(orders[1])

    def spread(o: list[list[int]]) -> float:
        """Mean length range of a step's global batch (rank 0's and rank 1's micro-batches together)."""
        ranges = [max(lengths[i] for i in o[0][k:k + 4] + o[1][k:k + 4])
                  - min(lengths[i] for i in o[0][k:k + 4] + o[1][k:k + 4]) for k in range(0, 100, 4)]
        return sum(ranges) / len(ranges)

    assert spread(orders) < 0.4 * spread(plain)  # each step's two micro-batches come from one length group
    ranks[0].set_epoch(0, start=8)
    assert list(ranks[0]) == orders[0][8:]
    ranks[0].set_epoch(1)
    assert ranks[0].order() != orders[0]  # another epoch, another order
