"""`make gpu-check`, switches part: each speed-up of the GPU training step measured off and on, back to back, on
the shipped ViT experiment (conf/vit/pretrain.yaml + conf/trainer/bf16.yaml) through `vitx fit`:

- fused_adamw: AdamW's fused kernel (`model.optim.fused`; vitx's default on CUDA) against torch's default;
- compile_whole_model: CompileBlocks(scope="model") against the shipped per-block compile (conf/trainer/compile.yaml);
- guard_sync_every_50: NonFiniteGuard reading its device-side flag every 50 steps instead of every step (each read
  is one host synchronisation);
- no_progress_bar: the progress bar refreshed every step converts the logged loss to a Python float (a host
  synchronisation per step) against no bar;
- pin_memory: pinned host batches (vitx's default on CUDA; Lightning then copies them non-blocking) against
  pageable ones.

Reported per switch: images/s off and on, and on/off. In the dry run (CPU) the switches that need CUDA are
skipped and the others run 2 steps each: the figures mean nothing there, the code path is what is checked.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.gpu_check_common import NEEDS_CUDA, OVER_BUDGET, Context, Section
from benchmarks.gpu_check_train import run_one


def _overlay(folder: Path, name: str, callbacks: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": callbacks}}))
    return path


def switches(folder: Path) -> dict[str, dict]:
    """switch -> {"off": (overlays, argv), "on": (overlays, argv), "cuda": needs CUDA}."""
    guard = "vit_experiments.callbacks.run_guard.NonFiniteGuard"
    compile_ = "vit_experiments.scaling.CompileBlocks"
    return {
        "fused_adamw": {"cuda": False,
                        "off": ([], ["--model.init_args.optim.fused", "false"]),
                        "on": ([], ["--model.init_args.optim.fused", "true"])},
        "guard_sync_every_50": {"cuda": False,
                                "off": ([_overlay(folder, "guard-1", [{"class_path": guard, "init_args": {
                                    "check_every_n_steps": 1}}])], []),
                                "on": ([_overlay(folder, "guard-50", [{"class_path": guard, "init_args": {
                                    "check_every_n_steps": 50}}])], [])},
        "no_progress_bar": {"cuda": False,
                            "off": ([], ["--trainer.enable_progress_bar", "true"]),
                            "on": ([], ["--trainer.enable_progress_bar", "false"])},
        "pin_memory": {"cuda": True,
                       "off": ([], ["--data.init_args.pin_memory", "false"]),
                       "on": ([], ["--data.init_args.pin_memory", "true"])},
        "compile_whole_model": {"cuda": True,
                                "off": (["compile"], []),
                                "on": ([_overlay(folder, "compile-model", [{"class_path": compile_, "init_args": {
                                    "scope": "model"}}])], [])},
    }


def run_switches(ctx: Context, section: Section) -> None:
    from benchmarks.gpu_check_corpora import write_demo_corpora

    corpora = write_demo_corpora(ctx.work / "corpora", ctx.options["corpus_images"])
    steps, warmup = ctx.options["switch_steps"], ctx.options["switch_warmup"]
    precision = ["bf16"] if ctx.cuda else []  # fp32 on the CPU (gpu_check_train.cpu_cannot says why)
    for name, switch in switches(ctx.work / "switch-overlays").items():
        if switch["cuda"] and not ctx.cuda:
            section.row(switch=name, status=NEEDS_CUDA)
            continue
        if ctx.left() < 10:
            section.row(switch=name, status=OVER_BUDGET)
            continue
        row = {"switch": name}
        for side in ("off", "on"):
            overlays, argv = switch[side]
            run = run_one(ctx, "vit", f"{name}-{side}", overlays + precision, corpora, None, steps, warmup,
                          ctx.options.get("train_batch_size"), extra=argv)
            row[side] = {k: run.get(k) for k in ("status", "images_per_s", "step_ms", "peak_mib", "loss_finite", "seconds")}
        off, on = row["off"], row["on"]
        bad = [f"{side}: {r['status']}" for side, r in (("off", off), ("on", on)) if r["status"] != "passed"]
        row["status"] = "failed: " + "; ".join(bad) if bad else "passed"
        if not bad and off["images_per_s"] and on["images_per_s"]:
            row["on_over_off"] = on["images_per_s"] / off["images_per_s"]
        section.row(**row)
