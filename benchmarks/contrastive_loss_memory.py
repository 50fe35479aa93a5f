"""Memory and time of CLIP's loss spread over W real processes (gloo, CPU): `contrastive_loss(local=True)`, each
process building only its own (B, N) rows of the N x N similarity matrix (N = W * B), against `local=False`, the
whole (N, N) matrix on every process (open_clip's default).

    python -m benchmarks.contrastive_loss_memory --world 2 --batch 2048 --dim 512

Every (variant, configuration) runs in fresh processes, so each one's peak resident memory (ru_maxrss) is its own:
the number reported is the rise of the peak over the forward + backward of the loss alone (the features are leaf
tensors, no towers), the most over the ranks, beside the logits' size as computed.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(rank: int, world: int, batch: int, dim: int, local: bool, init: str, out: str) -> None:
    from vit_experiments.losses import contrastive_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
        t = torch.tensor(2.659, requires_grad=True)
        warm = [torch.empty(batch, dim) for _ in range(world)]  # the gathers' buffers once, outside the measurement
        dist.all_gather(warm, img.detach())
        del warm
        dist.barrier()
        before = _rss_mib()
        start = time.perf_counter()
        loss = contrastive_loss(img, txt, t, local=local)
        loss.backward()
        seconds = time.perf_counter() - start
        peak = _rss_mib()
        rows = batch if local else batch * world
        result = {"rank": rank, "peak_rise_mib": peak - before, "seconds": seconds,
                  # local: (B, N) image rows and (B, N) caption rows; whole: one (N, N) matrix and its transpose
                  "logits_shape": [rows, batch * world],
                  "logits_mib": (2 if local else 1) * rows * batch * world * 4 / 2**20}
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def measure(world: int, batch: int, dim: int, local: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, batch, dim, local, f"{tmp}/init", f"{tmp}/out"), nprocs=world, join=True)
        ranks = [json.load(open(f"{tmp}/out.{r}")) for r in range(world)]
    return {"local": local, "world": world, "batch_per_process": batch, "global_batch": batch * world, "dim": dim,
            "logits_shape": ranks[0]["logits_shape"], "logits_mib": ranks[0]["logits_mib"],
            "peak_rise_mib": max(r["peak_rise_mib"] for r in ranks), "seconds": max(r["seconds"] for r in ranks)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, nargs="+", default=[2])
    p.add_argument("--batch", type=int, nargs="+", default=[2048], help="pairs per process")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    print("world  B/proc      N  variant        logits  logits MiB  peak RSS rise MiB  seconds")
    for world in args.world:
        for batch in args.batch:
            for local in (True, False):
                r = measure(world, batch, args.dim, local)
                rows.append(r)
                shape = "x".join(map(str, r["logits_shape"]))
                print(f"{world:5d}  {batch:6d}  {batch * world:5d}  {'local' if local else 'whole':7s}  "
                      f"{shape:>12s}  {r['logits_mib']:10.1f}  {r['peak_rise_mib']:17.1f}  {r['seconds']:7.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
