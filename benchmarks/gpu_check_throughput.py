"""`make gpu-check`, throughput part: benchmarks/throughput.py's measurement (vitx's ViT and CLIP against
`transformers`' and timm's models on the same device-resident batches, alternating rounds, MFU against a matmul
measured in the same run) for ViT-B/16, CLIP ViT-B/16, ViT-S/16 and ViT-Ti/16 at 224 px, bf16, compiled, in that
order (the headline first, should the part's time budget run out). timm and torchvision are imported only here
and only if present; a missing one is reported as "not installed". The dry run measures ViT-Ti/16 at 32 px on the
CPU in fp32, uncompiled, against `transformers` (CLIP is skipped there: its text tower is too large for it)."""

from __future__ import annotations

from benchmarks.gpu_check_common import NEEDS_CUDA, OVER_BUDGET, Context, Section, run_guarded


def reference_versions() -> dict[str, str]:
    out = {}
    for name in ("transformers", "timm", "torchvision"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001 - timm needs torchvision, which a CPU-only torch lacks
            out[name] = f"not installed ({type(err).__name__})"
    return out


def run_throughput(ctx: Context, section: Section) -> None:
    import torch

    from benchmarks import throughput as tp
    from benchmarks.measure import device_name, measure_peak_tflops

    if ctx.dry:
        argv = ["--sizes", "Ti/16", "--clip-sizes", "Ti/16", "--image-size", "32", "--batch-size", "2",
                "--steps", "1", "--rounds", "1", "--warmup", "1", "--precision", "fp32", "--no-compile",
                "--device", "cpu"]
        order, matmul = [("vit", "Ti/16")], 256
        section.row(family="clip", size="B/16", status=f"{NEEDS_CUDA} (CLIP's 12-layer text tower of width 512 "
                    "alone takes the CPU longer than the whole dry run may)")
    else:
        argv = ["--sizes", "B/16,S/16,Ti/16", "--clip-sizes", "B/16", "--image-size", "224", "--batch-size", "256",
                "--steps", "10", "--rounds", "2", "--warmup", "3", "--precision", "bf16", "--compile",
                "--device", "cuda"]
        order, matmul = [("vit", "B/16"), ("clip", "B/16"), ("vit", "S/16"), ("vit", "Ti/16")], 8192
    args = tp.parse_args(argv)
    versions = reference_versions()
    section.data["references"] = versions
    for name in ("transformers", "timm"):
        if versions[name].startswith("not installed"):
            section.note(f"{name}: not installed, so no {name} rows")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = measure_peak_tflops(device, dtype, matmul)
    section.data.update(peak_tflops=peak, peak_source=f"measured in this run: {matmul}^3 matmul, {args.precision}"
                        + (", per CPU-second" if device.type == "cpu" else ""), device=device_name(device),
                        settings={k: v for k, v in vars(args).items() if k not in ("out", "render")})
    trainer = tp.Trainer(device, args.precision)
    tp.warm_up_process(trainer)
    for family, size in order:
        if ctx.left() < 20:
            section.row(family=family, size=size, status=OVER_BUDGET)
            continue
        rows = run_guarded(section, f"throughput {family} {size}", tp.benchmark_size, family, size, args, trainer,
                           peak)
        for r in rows or []:
            section.row(status="passed", **{k: v for k, v in r.items() if not k.endswith("_rounds")},
                        step_ms_rounds=r["step_ms_rounds"])
