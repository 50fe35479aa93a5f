"""The epoch planner at corpus scale, by simulation (issue 14): 10,000 shards of uneven sizes over 512 ranks x 8
dataloader workers, planned in this process for every one of the 4096 readers, as each of them would plan itself."""

from __future__ import annotations

import random
import time
from collections import defaultdict

import pytest

from data_pipelines.planner import Piece, plan_slot, train_batches_per_rank, val_batches_per_rank

SHARDS, RANKS, WORKERS, BATCH = 10_000, 512, 8, 32


@pytest.fixture(scope="module")
def sizes() -> list[int]:
    rng = random.Random(0)  # mostly 200-1800 samples, some nearly empty shards, a few huge ones
    return [rng.choice([1, 2, 5]) if rng.random() < 0.05 else rng.randint(200, 1800) * (8 if rng.random() < 0.01 else 1)
            for _ in range(SHARDS)]


def plan_everything(sizes, train: bool, epoch: int = 0, resampled: bool = False, epoch_samples=None):
    """{rank: [SlotPlan per worker]} and the most CPU time one rank took to plan its workers."""
    plans, slowest = {}, 0.0
    for rank in range(RANKS):
        start = time.process_time()
        plans[rank] = [
            plan_slot(train=train, num_shards=SHARDS, sizes=sizes, epoch=epoch, seed=7, rank=rank, world_size=RANKS,
                      worker=w, num_workers=WORKERS, batch_size=BATCH, resampled=resampled, epoch_samples=epoch_samples)
            for w in range(WORKERS)
        ]
        slowest = max(slowest, time.process_time() - start)
    return plans, slowest


def covered(plans) -> dict[int, list[tuple[int, int]]]:
    """{shard: sorted [start, stop) ranges} read by all readers; asserts no two readers' ranges overlap."""
    by_shard: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for worker_plans in plans.values():
        for plan in worker_plans:
            for piece in plan.pieces:
                assert isinstance(piece, Piece) and 0 <= piece.start < piece.stop
                by_shard[piece.shard].append((piece.start, piece.stop))
    for ranges in by_shard.values():
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "a sample planned for two readers"
    return by_shard


@pytest.mark.parametrize("epoch", [0, 1])
def test_training_plan_at_scale_is_exact_and_equal(sizes, epoch):
    N = sum(sizes)
    T = train_batches_per_rank(N, BATCH, RANKS)
    plans, slowest = plan_everything(sizes, train=True, epoch=epoch)
    for rank, worker_plans in plans.items():
        assert sum(p.batches for p in worker_plans) == T, rank  # every rank the same number of batches
        for p in worker_plans:
            assert sum(piece.stop - piece.start for piece in p.pieces) == p.batches * BATCH  # exactly its quota
    ranges = covered(plans)
    read = sum(b - a for r in ranges.values() for a, b in r)
    assert read == T * BATCH * RANKS and N - read < BATCH * RANKS  # every sample once but the bounded tail
    assert all(b <= sizes[s] for s, r in ranges.items() for _, b in r)
    nxt = plan_slot(train=True, num_shards=SHARDS, sizes=sizes, epoch=epoch + 1, seed=7, rank=0, world_size=RANKS,
                    worker=0, num_workers=WORKERS, batch_size=BATCH)
    assert nxt.pieces != plans[0][0].pieces  # a new shard order (and so a new tail) every epoch
    assert slowest < 1.0  # planning is cheap: what each process does before its first batch


def test_resampled_plan_at_scale_gives_equal_batch_counts(sizes):
    E = 3_000_001
    plans, slowest = plan_everything(sizes, train=True, resampled=True, epoch_samples=E)
    T = train_batches_per_rank(E, BATCH, RANKS)
    assert T > 0 and all(sum(p.batches for p in wp) == T for wp in plans.values())
    assert all(p.pieces is None and p.refill for wp in plans.values() for p in wp)  # drawn with replacement
    assert slowest < 1.0


def test_validation_plan_at_scale_reads_every_sample_exactly_once(sizes):
    N = sum(sizes)
    plans, slowest = plan_everything(sizes, train=False)
    V = val_batches_per_rank(N, BATCH, RANKS)
    assert all(sum(p.batches for p in wp) == V for wp in plans.values())
    ranges = covered(plans)
    assert sum(b - a for r in ranges.values() for a, b in r) == N
    assert all(sum(b - a for a, b in ranges[s]) == sizes[s] for s in range(SHARDS))
    assert slowest < 1.0
