"""Memory and time of one CLIP training step (both towers, forward + backward) at an effective contrastive batch of
N pairs, made up four ways, each against the first in the same run:

    plain           one process, one batch of N pairs: the baseline
    plain-accum     one process, k micro-batches of N/k, each its own loss (what Lightning's accumulation does):
                    k problems of N/k pairs, not one of N, shown for its cost only
    feature-cache   one process, k micro-batches of N/k, one loss over all N (vit_experiments.tasks.feature_cache,
                    what ContrastivePretraining does under trainer.accumulate_grad_batches k)
    ddp-local       2 gloo processes of N/2 pairs, each scoring its own rows against the gathered N columns
                    (contrastive_loss(local=True), the default)
    ddp-whole       2 gloo processes of N/2 pairs, each building the whole N x N matrix (local=False)

    python -m benchmarks contrastive-accum [--pairs 512] [--accum 4] [--device cuda]

Every variant runs in fresh processes, so its peak memory is its own: on a GPU the allocator's peak over the step,
on a CPU the rise of the peak resident set over the step (benchmarks.measure.PeakMemory; VmHWM reset after a
warm-up step), the most over the processes. Time: the median of --reps steps after the warm-up. One thread per
process (--threads), so 2 processes use 2 cores. The gradients of plain and feature-cache are compared (they must
agree; plain-accum's differ by design).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"plain": 1, "plain-accum": 1, "feature-cache": 1, "ddp-local": 2, "ddp-whole": 2}  # -> processes


def _config(args):
    from vit_experiments.models.clip import CLIPConfig
    from vit_experiments.models.text import TextConfig
    from vit_experiments.models.vit import ViTConfig

    w = args.width
    vision = ViTConfig(variant=None, image_size=args.image_size, patch_size=args.patch_size, embed_dim=w,
                       depth=args.depth, num_heads=w // 64, mlp_dim=4 * w, num_classes=0, pre_norm=True,
                       patch_bias=False)
    text = TextConfig(vocab_size=1024, context_length=args.context, width=w, depth=args.depth, num_heads=w // 64)
    return CLIPConfig(embed_dim=w, vision=vision, text=text)


def _inputs(args, rows: slice, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.pairs, 3, args.image_size, args.image_size, generator=g)  # (N, 3, H, W)
    ids = torch.randint(3, 1000, (args.pairs, args.context), generator=g)  # (N, L)
    ids[:, -1] = 2  # the end token (TextConfig.eot_token_id), where the text feature is read
    return images[rows].to(device), ids[rows].to(device)


def _step(variant: str, model, images, ids, k: int) -> None:
    from vit_experiments.losses import contrastive_loss
    from vit_experiments.tasks.feature_cache import FeatureCache

    model.zero_grad(set_to_none=True)
    if variant in ("plain", "ddp-local", "ddp-whole"):
        img, txt, scale = model(images, ids)  # (B, E), (B, E), ()
        contrastive_loss(img, txt, scale, local=variant != "ddp-whole").backward()
    elif variant == "plain-accum":
        for x, t in zip(images.chunk(k), ids.chunk(k)):
            img, txt, scale = model(x, t)
            (contrastive_loss(img, txt, scale) / k).backward()
    else:  # feature-cache
        cache = FeatureCache()
        for x, t in zip(images.chunk(k), ids.chunk(k)):
            cache.cache(model, x, t)
        _, grads, scale_grad = cache.loss_and_gradients(model.logit_scale)
        for j in range(len(cache)):
            cache.replay(model, j, grads[j], scale_grad if j == len(cache) - 1 else None).backward()
    if dist.is_initialized():  # what DDP does after backward: the mean of the processes' gradients
        for p in model.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def _worker(rank: int, world: int, variant: str, args, init: str, out: str) -> None:
    from benchmarks.measure import PeakMemory, synchronize
    from vit_experiments.models.clip import CLIP

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = CLIP(_config(args)).to(device)
        per = args.pairs // world
        images, ids = _inputs(args, slice(rank * per, (rank + 1) * per), device)
        _step(variant, model, images, ids, args.accum)  # warm-up: kernels, gather buffers, gradient tensors
        memory = PeakMemory(device)
        memory.start()
        seconds = []
        for _ in range(args.reps):
            synchronize(device)
            start = time.perf_counter()
            _step(variant, model, images, ids, args.accum)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        result = {"rank": rank, "peak_mib": memory.peak_mib(), "seconds": statistics.median(seconds)}
        torch.save({"result": result, "grads": {n: p.grad.cpu() for n, p in model.named_parameters()}},
                   f"{out}.{rank}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(variant: str, args) -> dict:
    world = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, variant, args, f"{tmp}/init", f"{tmp}/out"), nprocs=world, join=True)
        ranks = [torch.load(f"{tmp}/out.{r}", weights_only=True) for r in range(world)]
    peaks = [r["result"]["peak_mib"] for r in ranks]
    return {"variant": variant, "processes": world, "pairs_per_process": args.pairs // world,
            "micro_batch": args.pairs // args.accum if "accum" in variant or variant == "feature-cache" else None,
            "peak_mib": None if None in peaks else max(peaks),
            "seconds": max(r["result"]["seconds"] for r in ranks), "grads": ranks[0]["grads"]}


def main(argv=None) -> int:
    from benchmarks.measure import device_name

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=512, help="the effective contrastive batch N")
    p.add_argument("--accum", type=int, default=4, help="micro-batches k of the accumulating variants")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--context", type=int, default=24)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.pairs % (2 * args.accum):
        p.error(f"--pairs {args.pairs} must divide into --accum {args.accum} micro-batches and 2 processes")
    if args.device != "cpu" and "ddp-local" in args.variants:
        p.error("the 2-process variants run on gloo, CPU only: --device cpu, or --variants plain plain-accum "
                "feature-cache")
    with torch.device("cpu"):
        torch.set_num_threads(args.threads)
        machine = device_name(torch.device(args.device))
    rows = [measure(v, args) for v in args.variants]
    base = rows[0]
    print(f"CLIP step at an effective contrastive batch of {args.pairs} pairs (k = {args.accum}); {machine}; "
          f"width {args.width}, depth {args.depth} per tower, {(args.image_size // args.patch_size) ** 2} patches, "
          f"{args.context} tokens")
    print(f"{'variant':14s} {'procs':>5s} {'pairs/proc':>10s} {'peak MiB':>9s} {'x ' + base['variant']:>10s} "
          f"{'s/step':>7s} {'x ' + base['variant']:>10s}")
    for r in rows:
        mem = f"{r['peak_mib']:9.1f}" if r["peak_mib"] is not None else f"{'n/a':>9s}"
        mem_x = f"{r['peak_mib'] / base['peak_mib']:10.2f}" if r["peak_mib"] and base["peak_mib"] else f"{'n/a':>10s}"
        print(f"{r['variant']:14s} {r['processes']:5d} {r['pairs_per_process']:10d} {mem} {mem_x} "
              f"{r['seconds']:7.3f} {r['seconds'] / base['seconds']:10.2f}")
    by_name = {r["variant"]: r for r in rows}
    agreement = None
    if "plain" in by_name and "feature-cache" in by_name:
        a, b = by_name["plain"]["grads"], by_name["feature-cache"]["grads"]
        agreement = max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-12)) for n in a)
        print(f"feature-cache vs plain: largest gradient difference {agreement:.1e} of the parameter's largest "
              f"gradient entry")
    result = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "out"},
              "feature_cache_vs_plain_grad_rel_diff": agreement,
              "rows": [{k: v for k, v in r.items() if k != "grads"} for r in rows]}
    for r in result["rows"]:
        r["peak_vs_baseline"] = r["peak_mib"] / base["peak_mib"] if r["peak_mib"] and base["peak_mib"] else None
        r["time_vs_baseline"] = r["seconds"] / base["seconds"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"contrastive_accumulation-{args.device}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
