"""CLIP's loss across 2 real processes (gloo, CPU) equals the loss of one process holding the whole batch, and
so do the gradients of every parameter and the parameters after one optimizer step."""

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


def _step(model: torch.nn.Module, images, ids) -> torch.Tensor:
    img, txt, scale = model(images, ids)
    loss = contrastive_loss(img, txt, scale)
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
    ref_loss = _step(reference, images, ids)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        loss = _step(ddp, images[rows], ids[rows])  # gradients averaged over processes by DDP
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        torch.testing.assert_close(mean_loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(loss, ref_loss), "each process's own loss differs; only their mean is the total"
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"gradient of {name} on rank {rank}: {m}")
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name: f"{name} after one step on rank {rank}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    init_file = tmp_path / "rendezvous"
    context = mp.spawn(_worker, args=(str(init_file),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2 processes did not finish within 180 s (hanging at a collective?)")
