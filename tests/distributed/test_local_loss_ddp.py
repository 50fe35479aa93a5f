"""The two ways of spreading CLIP's loss over 2 real processes (gloo, CPU), `contrastive_loss(..., local=True)`
(each process scores its own rows against the gathered columns: (B, N) logits) and `local=False` (the whole (N, N)
matrix on every process), against one process holding the whole batch: the same loss (as the mean over processes),
the same gradient of every parameter, and so the same parameters after one optimizer step."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.models.test_clip import captions, tiny_config
from vit_experiments.losses import contrastive_loss
from vit_experiments.models.clip import CLIP

WORLD = 2
BATCH = 8  # global; 4 rows per process
DEADLINE_S = 180


def _step(model: torch.nn.Module, images, ids, local: bool) -> torch.Tensor:
    img, txt, scale = model(images, ids)
    loss = contrastive_loss(img, txt, scale, local=local)
    loss.backward()
    return loss


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CLIP(tiny_config())
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 16, 16, generator=g)
    ids = captions(BATCH, seed=1)

    # the reference, before any process group exists: one process, the whole batch
    reference = copy.deepcopy(model)
    ref_loss = _step(reference, images, ids, local=True)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    ref_params = dict(reference.named_parameters())

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        for local in (True, False):
            replica = copy.deepcopy(model)
            ddp = torch.nn.parallel.DistributedDataParallel(replica)
            loss = _step(ddp, images[rows], ids[rows], local)  # gradients averaged over processes by DDP
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= WORLD
            torch.testing.assert_close(mean_loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
            if local:  # each process's share differs from the total; only their mean is the total
                assert not torch.allclose(loss, ref_loss)
            else:  # every process computes the whole batch's loss
                torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
            for name, p in replica.named_parameters():
                torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=name: f"local={local}: gradient of {n} on rank {rank}: {m}")
            torch.optim.SGD(replica.parameters(), lr=0.1).step()
            for name, p in replica.named_parameters():
                torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name: f"local={local}: {n} after a step, rank {rank}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_local_and_whole_matrix_losses_equal_one_process_with_the_whole_batch(tmp_path):
    init_file = tmp_path / "rendezvous"
    context = mp.spawn(_worker, args=(str(init_file),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2 processes did not finish within {DEADLINE_S} s (hanging at a collective?)")
