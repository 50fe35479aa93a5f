"""`make gpu-check`, training part: each family's shipped experiment under each GPU overlay, through `vitx fit`.

Per family (conf/cnn/teacher-shapes.yaml, conf/vit/pretrain.yaml, conf/deit/distill-shapes.yaml with the CNN's
checkpoint as its teacher, conf/clip/demo.yaml) and per overlay stack of conf/trainer/ (bf16; fp16 with its
gradient scaler; FSDP2 on the one device with bf16; activation checkpointing with bf16; compile with bf16): a
`vitx fit` of a few dozen steps (one epoch that ends there, so validation, checkpointing and the analysis
callback run too) on the 32-px corpora, with a StepTimer (benchmarks/gpu_check_timer.py) that records the step
time, the peak memory and whether every loss was finite. A run passes when vitx exits 0, every step's loss was
finite and steps were timed. The dry run (CPU) does 2 steps and skips what a CPU cannot run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.gpu_check_common import CONF, NEEDS_CUDA, OVER_BUDGET, TRAINER, Context, Section, accelerator_args, vitx
from benchmarks.gpu_check_corpora import pattern
from benchmarks.gpu_check_timer import timer_overlay

FAMILIES = {  # in this order: the CNN's run is DeiT's teacher
    "cnn": CONF / "cnn" / "teacher-shapes.yaml",
    "vit": CONF / "vit" / "pretrain.yaml",
    "deit": CONF / "deit" / "distill-shapes.yaml",
    "clip": CONF / "clip" / "demo.yaml",
}
# overlay name -> the conf/trainer/ files stacked for it (precision overlays last, as the files' comments show)
OVERLAYS = {
    "bf16": ["bf16"],
    "fp16": ["fp16"],
    "fsdp": ["fsdp", "bf16"],
    "activation_checkpointing": ["activation_checkpointing", "bf16"],
    "compile": ["compile", "bf16"],
}


# seconds a run needs left in the part's budget to be started (compiling the blocks takes most of a compile run)
START_S = {"compile": 35.0, "other": 5.0}


def cpu_cannot(overlay: str) -> Optional[str]:
    """Why the dry run (CPU) skips an overlay, or None when it runs it. The CPU runs of bf16 and compile are
    tests/matrix's; here they would cost minutes (bf16 convolutions on a CPU without bf16 matrix units took ~20 s
    a step for the ResNet teacher; inductor compiles C++ for every block)."""
    if overlay == "fp16":
        return f"{NEEDS_CUDA} (Lightning runs no fp16 AMP on a CPU: 16-mixed falls back to bf16)"
    if overlay == "bf16":
        return f"{NEEDS_CUDA} (bf16 autocast on a CPU is emulated and slow; tests/matrix runs it)"
    if overlay == "compile":
        return f"{NEEDS_CUDA} (inductor's C++ compilation on a CPU outlasts the dry run; tests/matrix -m slow runs it)"
    return None


def stack_for(ctx: Context, overlay: str) -> list:
    """The overlay files of one run: on the CPU without the bf16 overlay (fp32), for the reason above."""
    stack = OVERLAYS[overlay]
    return stack if ctx.cuda else [s for s in stack if s != "bf16"]


def fit_argv(ctx: Context, family: str, stack: list, runs: Path, timer: Path, corpora: dict,
             teacher: Optional[Path], steps: int, batch_size: Optional[int], extra: Sequence[str] = ()) -> list[str]:
    config = FAMILIES[family]
    folder = corpora["captions"] if family == "clip" else corpora["shapes"]
    argv = ["fit", "--config", config]
    for overlay in stack:  # a name in conf/trainer/, or the path of an overlay written by the check
        argv += ["--config", overlay if isinstance(overlay, Path) else TRAINER / f"{overlay}.yaml"]
    argv += ["--config", timer,
             "--data.init_args.train_shards", pattern(folder, "train"),
             "--data.init_args.val_shards", pattern(folder, "val"),
             *accelerator_args(ctx, runs),
             "--trainer.max_epochs", "1", "--trainer.max_steps", str(steps),
             "--trainer.limit_train_batches", str(steps), "--trainer.limit_val_batches", "1"]
    if ctx.dry:
        argv += ["--data.init_args.num_workers", "0"]
    if batch_size:
        argv += ["--data.init_args.batch_size", str(batch_size)]
    if family == "clip":
        argv += ["--model.init_args.tokenizer", folder / "tokenizer.json"]
    if family == "deit":
        argv += ["--model.init_args.teacher_ckpt", teacher]
    return [str(a) for a in argv] + [str(a) for a in extra]


def run_one(ctx: Context, family: str, name: str, stack: list, corpora: dict, teacher: Optional[Path],
            steps: int, warmup: int, batch_size: Optional[int], extra: Sequence[str] = ()) -> dict:
    """One `vitx fit`; returns its row (status, step time, loss, peak memory) whatever happens."""
    import json

    folder = ctx.work / "train" / f"{family}-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = folder / "timer.json"
    timer = timer_overlay(folder / "timer.yaml", out, warmup=warmup, steps=steps - warmup,
                          budget_s=max(5.0, ctx.left() - 5))
    row = {"family": family, "overlay": name, "stack": [s if isinstance(s, str) else s.name for s in stack],
           "config": str(FAMILIES[family].relative_to(CONF.parent))}
    started = time.monotonic()
    try:
        vitx(fit_argv(ctx, family, stack, folder / "runs", timer, corpora, teacher, steps, batch_size, extra))
    except BaseException as err:  # noqa: BLE001 - the row says what failed; the next run still runs
        if isinstance(err, KeyboardInterrupt):
            raise
        row.update(status=f"failed: {type(err).__name__}: {str(err)[-1500:]}")
    row["seconds"] = round(time.monotonic() - started, 1)
    if out.is_file():
        row.update(json.loads(out.read_text()))
    if "status" not in row:
        if not out.is_file() or not row.get("steps_timed"):
            row["status"] = "failed: no step was timed"
        elif not row.get("loss_finite"):
            row["status"] = f"failed: non-finite loss ({row.get('loss')})"
        else:
            row["status"] = "passed"
    ckpts = sorted((folder / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    row["checkpoint"] = str(ckpts[-1]) if ckpts else None
    return row


def teacher_for_deit(ctx: Context, corpora: dict, section: Section, steps: int, batch_size: Optional[int]) -> Path:
    """The CNN family's checkpoint (written by its part), else a teacher trained here for a few steps."""
    teacher = ctx.work / "teacher.ckpt"
    if not teacher.is_file():
        section.note("no CNN checkpoint from the cnn part: a teacher is trained here first (fp32, 2 steps)")
        row = run_one(ctx, "cnn", "teacher", [], corpora, None, 2, 1, batch_size)
        if row["status"] != "passed" or not row["checkpoint"]:
            raise RuntimeError(f"could not train DeiT's teacher: {row['status']}")
        shutil.copy(row["checkpoint"], teacher)
    return teacher


def run_family(ctx: Context, section: Section, family: str) -> None:
    from benchmarks.gpu_check_corpora import write_demo_corpora

    steps, warmup = ctx.options["train_steps"], ctx.options["train_warmup"]
    batch_size = ctx.options.get("train_batch_size")
    corpora = write_demo_corpora(ctx.work / "corpora", ctx.options["corpus_images"])
    teacher = teacher_for_deit(ctx, corpora, section, steps, batch_size) if family == "deit" else None
    for name, stack in OVERLAYS.items():
        skip = cpu_cannot(name) if not ctx.cuda else None
        if skip:
            section.row(family=family, overlay=name, stack=stack, status=skip)
            continue
        if ctx.left() < (START_S["compile"] if ctx.cuda and name == "compile" else START_S["other"]):
            section.row(family=family, overlay=name, stack=stack, status=OVER_BUDGET)
            continue
        row = section.row(**run_one(ctx, family, name, stack_for(ctx, name), corpora, teacher, steps, warmup,
                                    batch_size))
        if family == "cnn" and row["status"] == "passed" and row["checkpoint"] and not (ctx.work / "teacher.ckpt").exists():
            shutil.copy(row["checkpoint"], ctx.work / "teacher.ckpt")
