"""Training throughput of vitx's ViT (and CLIP) against reference implementations of the same size.

    python -m benchmarks.throughput                       # ViT-Ti/16, S/16, B/16 at 224 px (+ CLIP B/16 on a GPU)
    python -m benchmarks.throughput --sizes Ti/16 --image-size 112 --batch-size 16
    make bench ARGS="throughput --sizes B/16"

For each size, in one process and on the same device-resident synthetic batches (random normalised images and
labels, or token ids for CLIP): vitx's model, the `transformers` library's model of the same configuration
(ViTForImageClassification / CLIPModel, SDPA attention, exact GELU, no dropout), and timm's VisionTransformer
where timm is importable. A training step is forward, loss (cross-entropy; CLIP's contrastive loss for both
CLIPs), backward and an AdamW step, under bf16 autocast on a GPU (fp32 on a CPU), each model compiled with
torch.compile on a GPU (the same treatment for every implementation). The models are timed in alternating
rounds: images/s is each model's median round, and vitx's speed-up over a reference is the median over rounds of
the ratio of their times in the same round, so that load from other jobs on a shared machine falls on both.

Reported per model: images/s, model FLOPs per image (forward + backward, from torch.utils.flop_counter on the
eager model), achieved TFLOP/s and model FLOPs utilisation (MFU) against a peak measured in the same run with a
large matmul in the training dtype (or given with --peak-tflops; on a CPU both per second of the process's CPU
time, which other jobs on a shared machine do not distort), images per CPU-second (CPU only), peak memory (CUDA: the most allocated while
training it, over what was allocated before it was built; CPU: growth of the peak resident set size), and
vitx's speed relative to each reference. Writes throughput-<device>.json and .md to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
from torch.utils import flop_counter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.candidates import (  # noqa: E402
    Candidate, classification_loss, clip_candidates, make_batches, vit_candidates, vit_config,
)
from benchmarks.measure import PeakMemory, device_name, measure_peak_tflops, synchronize  # noqa: E402
from vit_experiments.models.vit import ViTConfig, VisionTransformer  # noqa: E402


class Trainer:
    """The same training step for every candidate: autocast forward + loss, backward, AdamW step."""

    def __init__(self, device: torch.device, precision: str):
        self.device = device
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())

    def setup(self, c: Candidate) -> None:
        c.module.to(self.device).train()
        fused = self.device.type == "cuda"
        c.optimizer = torch.optim.AdamW(c.module.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)

    def step(self, c: Candidate, batch: tuple) -> None:
        with self.autocast:
            loss = c.loss(c.module, batch)
        loss.backward()
        c.optimizer.step()
        c.optimizer.zero_grad(set_to_none=True)

    def count_flops(self, c: Candidate, batch: tuple) -> float:
        """FLOPs of forward + backward (the optimizer's elementwise work is not model FLOPs)."""
        with flop_counter.FlopCounterMode(display=False) as counter:
            with self.autocast:
                loss = c.loss(c.module, batch)
            loss.backward()
        c.module.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    def timed(self, c: Candidate, batches: list, steps: int) -> tuple[float, float]:
        """(wall-clock seconds, process CPU seconds) per step over `steps` steps."""
        synchronize(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(steps):
            self.step(c, batches[i % len(batches)])
        synchronize(self.device)
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def warm_up_process(trainer: Trainer) -> None:
    """One step of a tiny ViT before any measurement: thread pools, kernel libraries and the autograd engine
    start here, so that neither their time nor their memory lands on whichever model happens to be first."""
    cfg = ViTConfig(variant=None, image_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    c = Candidate("warm-up", VisionTransformer(cfg), classification_loss(lambda m, x: m(x)))
    trainer.setup(c)
    x = torch.randn(2, 3, 32, 32, device=trainer.device)
    y = torch.zeros(2, dtype=torch.long, device=trainer.device)
    trainer.count_flops(c, (x, y))
    trainer.step(c, (x, y))
    synchronize(trainer.device)


def benchmark_size(family: str, size: str, args, trainer: Trainer, peak_tflops: float) -> list[dict]:
    device = trainer.device
    batches = make_batches(family, 2, args.batch_size, args.image_size, device)
    build = vit_candidates if family == "vit" else clip_candidates
    memory = PeakMemory(device)
    candidates: list[Candidate] = []
    torch.manual_seed(0)
    for make in build(size, args.image_size, args.refs):  # built one at a time: each memory figure is its own
        memory.start()
        c = make()
        trainer.setup(c)
        c.flops_per_step = trainer.count_flops(c, batches[0])
        if args.compile:
            c.module.compile()
        trainer.timed(c, batches, args.warmup)  # compiles, creates the optimizer state, warms the allocator
        c.peak_mib = memory.peak_mib()
        candidates.append(c)
        print(f"  {family} {size} {c.impl}: built and warmed up", flush=True)
    for _ in range(args.rounds):  # alternate, so that load from elsewhere falls on every candidate alike
        for c in candidates:
            wall, cpu = trainer.timed(c, batches, args.steps)
            c.step_s.append(wall)
            c.cpu_s.append(cpu)
    rows = [
        {
            "family": family, "size": size, "image_size": args.image_size, "impl": c.impl,
            "batch_size": args.batch_size, "flops_per_step": c.flops_per_step, "peak_mib": c.peak_mib,
            "params_m": sum(p.numel() for p in c.module.parameters()) / 1e6,
            "step_ms_rounds": [t * 1e3 for t in c.step_s], "cpu_ms_rounds": [t * 1e3 for t in c.cpu_s],
        }
        for c in candidates
    ]
    summarise(rows, peak_tflops, device.type)
    del candidates, c, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def summarise(rows: list[dict], peak_tflops: float, device_type: str) -> None:
    """Add the reported figures to the rows of one model size (vitx's first) from their raw rounds.

    images/s, TFLOP/s and MFU come from the median round. On a CPU, TFLOP/s and MFU are per second of this
    process's CPU time, like the peak: what the job itself spent, which other jobs' load does not distort.
    vitx's speed-up over a reference is the median over rounds of the ratio of their times in the same round,
    where both ran back to back under the same load."""
    for r in rows:
        step = statistics.median(r["step_ms_rounds"]) / 1e3
        cpu = statistics.median(r["cpu_ms_rounds"]) / 1e3
        r["images_per_s"] = r["batch_size"] / step
        r["images_per_cpu_s"] = r["batch_size"] / cpu
        r["gflop_per_image"] = r["flops_per_step"] / r["batch_size"] / 1e9
        r["tflops"] = r["flops_per_step"] / (step if device_type == "cuda" else cpu) / 1e12
        r["mfu"] = r["tflops"] / peak_tflops
    vitx = rows[0]
    for ref in rows[1:]:
        for key, prefix in (("step_ms_rounds", "speedup_vs_"), ("cpu_ms_rounds", "cpu_speedup_vs_")):
            vitx[prefix + ref["impl"]] = statistics.median(
                t_ref / t_vitx for t_ref, t_vitx in zip(ref[key], vitx[key]))


def markdown(result: dict) -> str:
    env = result["environment"]
    cpu = env["device_type"] == "cpu"
    lines = [
        f"Training throughput on {env['device']} ({env['precision']}, compile={env['compile']}), torch "
        f"{env['torch']}, transformers {env['transformers']}, timm {env['timm'] or 'not installed'}; "
        f"peak {result['peak_tflops'] * 1e3:.0f} GFLOP/s ({result['peak_source']}); load average "
        f"{env['load_average']:.1f}; {env['date']}.",
        "",
        "| model | implementation | batch | images/s | vitx speed-up | "
        + ("images/CPU-s | vitx speed-up (CPU time) | " if cpu else "")
        + f"GFLOP/image | {'TFLOP/CPU-s' if cpu else 'TFLOP/s'} | MFU | peak memory (MiB) |",
        "| --- | --- | ---: | ---: | ---: | " + ("---: | ---: | " if cpu else "") + "---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        name = f"{'ViT' if r['family'] == 'vit' else 'CLIP ViT'}-{r['size']} @{r['image_size']}"

        def ups(prefix):
            return ", ".join(f"{v:.2f}x vs {k.removeprefix(prefix)}" for k, v in r.items() if k.startswith(prefix))

        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        cells = [name, r["impl"], str(r["batch_size"]), f"{r['images_per_s']:.1f}", ups("speedup_vs_")]
        if cpu:
            cells += [f"{r['images_per_cpu_s']:.2f}", ups("cpu_speedup_vs_")]
        cells += [f"{r['gflop_per_image']:.2f}", f"{r['tflops']:.3f}", f"{100 * r['mfu']:.1f}%", mem]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def available_refs() -> list[str]:
    refs = []
    for name in ("transformers", "timm"):
        try:
            __import__(name)
            refs.append(name)
        except Exception:  # timm needs torchvision, which a CPU-only torch build may lack
            pass
    return refs


def version(name: str) -> Optional[str]:
    try:
        return __import__(name).__version__
    except Exception:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="Ti/16,S/16,B/16", help="comma-separated ViT variants")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--families", default="vit,clip" if gpu else "vit", help="vit and/or clip")
    p.add_argument("--clip-sizes", default="B/16",
                   help="image towers of the CLIP models (the text tower is CLIP's: 12 layers of width 512)")
    p.add_argument("--batch-size", type=int, default=256 if gpu else 4, help="per step (per device)")
    p.add_argument("--steps", type=int, default=20 if gpu else 1, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3 if gpu else 5, help="alternating rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=10 if gpu else 1, help="untimed steps (compilation happens here)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16" if gpu else "fp32",
                   help="bf16 autocast (fp32 weights) or plain fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=gpu,
                   help="torch.compile every model (default on a GPU)")
    p.add_argument("--refs", default=",".join(available_refs()),
                   help="reference implementations to compare against (default: those importable)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak; measured when not given")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 gives the steadiest ratios on a shared CPU")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only recompute the figures and the table of an earlier result file (rewrites it and its .md)")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.clip_sizes = [s.strip() for s in args.clip_sizes.split(",") if s.strip()]
    args.families = [s.strip() for s in args.families.split(",") if s.strip()]
    args.refs = [s.strip() for s in args.refs.split(",") if s.strip()]
    for family in args.families:
        if family not in ("vit", "clip"):
            p.error(f"unknown family {family!r}; choose from vit, clip")
    for size in args.sizes + args.clip_sizes:
        vit_config(size, args.image_size)  # a bad variant or image size fails here, with the valid choices
    unknown = set(args.refs) - {"transformers", "timm"}
    if unknown:
        p.error(f"unknown reference {sorted(unknown)}; choose from transformers, timm")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return render(args.render)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if args.peak_tflops:
        peak, source = args.peak_tflops, "given"
    else:
        n = 8192 if device.type == "cuda" else 2048
        peak, source = measure_peak_tflops(device, dtype, n), f"measured: {n}^3 matmul, {args.precision}"
        if device.type == "cpu":
            source += ", per CPU-second"
    print(f"peak {peak:.2f} TFLOP/s ({source}) on {device_name(device)}", flush=True)
    trainer = Trainer(device, args.precision)
    warm_up_process(trainer)
    rows = []
    for family in args.families:
        for size in args.sizes if family == "vit" else args.clip_sizes:
            size_rows = benchmark_size(family, size, args, trainer, peak)
            rows += size_rows
            partial = {"rows": size_rows, "peak_tflops": peak, "peak_source": source,
                       "environment": _environment(args, device)}
            print(markdown(partial).split("\n", 2)[2], flush=True)  # the table rows, without the caption
    result = {"environment": _environment(args, device), "peak_tflops": peak, "peak_source": source,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"throughput-{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return result


def render(path: Path) -> dict:
    result = json.loads(path.read_text())
    device_type = result["environment"]["device_type"]
    for key in sorted({(r["family"], r["size"]) for r in result["rows"]}, key=str):
        summarise([r for r in result["rows"] if (r["family"], r["size"]) == key], result["peak_tflops"], device_type)
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def _environment(args, device: torch.device) -> dict:
    return {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__, "transformers": version("transformers"),
        "timm": version("timm"), "precision": args.precision, "compile": args.compile,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


if __name__ == "__main__":
    main()
