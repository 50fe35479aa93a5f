"""The streaming layer under 2 real processes (gloo, CPU): shards of very unequal sizes still give both
ranks the same number of batches every epoch (no hang at a collective), the ranks read disjoint samples,
the epoch reaches persistent dataloader workers (a new order every epoch), and the validation metric over
2 processes equals the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.distributed._data_ddp import BATCH, EPOCHS, TRAIN_SIZES, VAL_SIZES, val_metric_reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def _run(mode: str, out) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    try:  # a hang (ranks disagreeing on the batch count) shows up as a timeout, not a stuck test run
        proc = subprocess.run([sys.executable, "-m", "tests.distributed._data_ddp", mode, str(out)], cwd=out,
                              env=env, timeout=120, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"2-process {mode} run did not finish within 120 s (ranks hanging at a collective?)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _check_training(ranks: list[dict]) -> None:
    total = sum(TRAIN_SIZES)
    per_rank = total // (BATCH * 2) * BATCH  # samples per rank per epoch: floor(160 / 8) batches of 4
    for epoch in range(EPOCHS):
        a, b = ranks[0]["train"][epoch], ranks[1]["train"][epoch]
        assert len(a) == len(b) == per_rank  # equal batch counts
        assert not set(a) & set(b)  # disjoint
        assert len(set(a) | set(b)) == 2 * per_rank == total  # 160 is divisible by 8: every sample once
    for r in range(2):
        orders = [tuple(ranks[r]["train"][e]) for e in range(EPOCHS)]
        assert len(set(orders)) == EPOCHS  # a new order every epoch, with persistent workers


def test_plain_torch_distributed(tmp_path):
    ranks = _run("plain", tmp_path)
    _check_training(ranks)
    assert ranks[0]["len"] == ranks[1]["len"] == sum(TRAIN_SIZES) // (BATCH * 2)
    assert ranks[0]["val_batches"] == ranks[1]["val_batches"]
    seen = ranks[0]["val_labels"] + ranks[1]["val_labels"]
    assert sorted(seen) == list(range(sum(VAL_SIZES)))  # every validation sample exactly once
    assert ranks[0]["val_metric"] == ranks[1]["val_metric"] == pytest.approx(val_metric_reference())


def test_lightning_ddp(tmp_path):
    ranks = _run("lightning", tmp_path)
    _check_training(ranks)
    assert ranks[0]["val_batches"] == ranks[1]["val_batches"]
    for r in range(2):
        assert ranks[r]["val_metrics"] == [pytest.approx(val_metric_reference())] * EPOCHS
