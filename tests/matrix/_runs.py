"""What the matrix tests share: the command-line overrides that shrink a shipped experiment to a few CPU steps on
tiny corpora, the families and overlays, and `vitx` run in this process.

Nothing here stands in for a shipped class: every run is `vitx fit|validate|analyze` on a YAML file of conf/ with
fields overridden on the command line, as a user would.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
TRAINER = CONF / "trainer"
BATCH = 8  # per device; the corpora's 16 validation images are 2 batches on 1 process, 1 batch per rank on 2

# one experiment per family: the overlays are stacked on these
FAMILIES = {
    "vit": CONF / "vit" / "pretrain.yaml",
    "deit": CONF / "deit" / "distill-shapes.yaml",
    "clip": CONF / "clip" / "demo.yaml",
    "cnn": CONF / "cnn" / "teacher-shapes.yaml",
}


@dataclass(frozen=True)
class Inputs:
    """What the shipped experiments read, made small: an image-label corpus (data_pipelines.writers), an
    image-text corpus with its tokenizer.json (writers_captions, tokenizer), and the checkpoints that some
    experiments start from (a CNN teacher for DeiT, a pretrained ViT for fine-tuning)."""

    shapes: Path
    captions: Path
    teacher: Optional[Path] = None
    pretrained: Optional[Path] = None


def experiment(config: Path) -> dict:
    return yaml.safe_load(Path(config).read_text())


def pattern(folder: Path, split: str) -> str:
    """The brace pattern of a split's shards in `folder`."""
    n = len(list(folder.glob(f"{split}-*.tar")))
    assert n, f"no {split} shards in {folder}"
    return str(folder / (f"{split}-{{000000..{n - 1:06d}}}.tar" if n > 1 else f"{split}-000000.tar"))


def is_image_text(config: Path) -> bool:
    return experiment(config)["data"]["class_path"].endswith("ImageTextDataModule")


def starts_from(config: Path) -> set[str]:
    """Which checkpoints an experiment reads: {"teacher"} for a DeiT student, {"pretrained"} for fine-tuning."""
    init = experiment(config)["model"].get("init_args") or {}
    needs = set()
    if init.get("teacher_ckpt") and init.get("distillation", "hard") != "none":
        needs.add("teacher")
    if init.get("init_from"):
        needs.add("pretrained")
    return needs


def has_vit(config: Path) -> bool:
    """Whether the experiment's model has a ViT (classifier, DeiT student or CLIP image tower) for `vitx analyze`."""
    init = experiment(config)["model"].get("init_args") or {}
    return "vit" in init or "clip" in init


def data_args(config: Path, inputs: Inputs, batch_size: int = BATCH) -> list[str]:
    """Point an experiment at the tiny corpora and at the checkpoints it starts from."""
    init = experiment(config)["model"].get("init_args") or {}
    folder = inputs.captions if is_image_text(config) else inputs.shapes
    args = [
        "--data.init_args.train_shards", pattern(folder, "train"),
        "--data.init_args.val_shards", pattern(folder, "val"),
        "--data.init_args.batch_size", str(batch_size),
        "--data.init_args.num_workers", "0",
    ]
    if "tokenizer" in init:
        args += ["--model.init_args.tokenizer", str(folder / "tokenizer.json")]
    if "teacher_ckpt" in init:
        assert inputs.teacher is not None, f"{config} needs a teacher checkpoint"
        args += ["--model.init_args.teacher_ckpt", str(inputs.teacher)]
    if init.get("init_from"):
        assert inputs.pretrained is not None, f"{config} needs a pretrained checkpoint"
        args += ["--model.init_args.init_from", str(inputs.pretrained)]
    return args


def accumulation(overlays: Sequence[str]) -> int:
    value = 1
    for overlay in overlays:
        value = (experiment(TRAINER / f"{overlay}.yaml").get("trainer") or {}).get("accumulate_grad_batches", value)
    return value


def common_trainer_args(runs: Path, devices: int) -> list[str]:
    return [
        "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices),
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]


def fit_args(config: Path, inputs: Inputs, runs: Path, overlays: Sequence[str] = (), steps: int = 1,
             devices: int = 1) -> list[str]:
    """`vitx fit` of a shipped experiment (with overlays) for `steps` optimiser steps, one epoch that ends there
    (so validation, checkpointing and the analysis callback run once at its end, on the 16 validation images)."""
    args = ["fit", "--config", str(config)]
    for overlay in overlays:
        args += ["--config", str(TRAINER / f"{overlay}.yaml")]
    return args + data_args(config, inputs) + common_trainer_args(runs, devices) + [
        "--trainer.max_epochs", "1",
        "--trainer.max_steps", str(steps),
        "--trainer.limit_train_batches", str(steps * accumulation(overlays)),
        "--trainer.num_sanity_val_steps", "0",
    ]


def validate_args(config: Path, inputs: Inputs, runs: Path, ckpt: Path, overlays: Sequence[str] = ()) -> list[str]:
    args = ["validate", "--config", str(config)]
    for overlay in overlays:
        args += ["--config", str(TRAINER / f"{overlay}.yaml")]
    return args + data_args(config, inputs) + common_trainer_args(runs, 1) + ["--ckpt_path", str(ckpt)]


def vitx(argv: Sequence[str]) -> None:
    """`vitx ARGV` in this process; a non-zero exit is an error that names the command."""
    from vit_experiments.cli import main

    try:
        main(list(argv))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise AssertionError(f"`vitx {' '.join(map(str, argv))}` exited with {exit_.code}") from None


def analyze(ckpt: Path, images: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    """`vitx analyze` in this process: (exit code, stdout, stderr)."""
    from vit_experiments.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(["analyze", "--ckpt", str(ckpt), "--images", str(images), "--out", str(out), "--device", "cpu",
                  "--num-images", "4", *extra])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, stdout.getvalue(), stderr.getvalue()


def the_run(runs: Path) -> Path:
    """The one run directory (runs/<name>/version_N) that a command wrote under `runs`."""
    found = sorted(p for p in runs.glob("*/version_*") if p.is_dir())
    assert len(found) == 1, f"expected one run directory under {runs}, found {found}"
    return found[0]


def last_checkpoint(runs: Path) -> Path:
    run = the_run(runs)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), f"no checkpoints/last.ckpt in {run}: {sorted(p.name for p in run.rglob('*'))}"
    return ckpt


def scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert tag in tags, f"{tag} not logged in {run}: {sorted(tags)}"
    return [e.value for e in acc.Scalars(tag)]


def trained_normalization(config: Path) -> tuple[list[float], list[float]]:
    """The (mean, std) an experiment trains with, from its YAML: the task's explicit mean/std, else the data
    module's explicit mean/std, else its `normalization` preset (the data module's default when unset)."""
    from data_pipelines.transforms import mean_std

    exp = experiment(config)
    model, data = exp["model"].get("init_args") or {}, exp["data"].get("init_args") or {}
    for source in (model, data):
        if source.get("mean") and source.get("std"):
            return list(source["mean"]), list(source["std"])
    preset = data.get("normalization")
    if preset is None:
        module, _, name = exp["data"]["class_path"].rpartition(".")
        param = inspect.signature(getattr(importlib.import_module(module), name)).parameters.get("normalization")
        preset = param.default if param is not None else ("clip" if is_image_text(config) else "imagenet")
    mean, std = mean_std(preset)
    return list(mean), list(std)


def reported_normalization(record: dict) -> Optional[tuple[list[float], list[float]]]:
    """The (mean, std) that `vitx analyze` says it used in analysis.json, in any of the obvious layouts, or None."""
    norm = record.get("normalization")
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        return list(norm["mean"]), list(norm["std"])
    if isinstance(norm, (list, tuple)) and len(norm) == 2:
        return list(norm[0]), list(norm[1])
    for mean_key, std_key in (("mean", "std"), ("pixel_mean", "pixel_std")):
        if mean_key in record and std_key in record:
            return list(record[mean_key]), list(record[std_key])
    return None


def assert_analyzed_with(out: Path, stderr: str, mean: list[float], std: list[float]) -> dict:
    """analyze wrote its report, used the checkpoint's normalisation (no fallback) and, where it reports the
    normalisation, it is the one the run trained with."""
    assert "names no mean/std" not in stderr, f"analyze fell back to a default normalisation:\n{stderr}"
    record = json.loads((out / "analysis.json").read_text())
    reported = reported_normalization(record)
    if reported is not None:
        # analysis.json keeps 6 significant digits
        assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(reported[0] + reported[1], mean + std)), (
            f"analyze used mean/std {reported}, the run trained with {(mean, std)}")
    return record
