"""Every family x every trainer overlay that can run on a CPU: `vitx fit --config <family's experiment> --config
conf/trainer/<overlay>.yaml` trains 2 optimiser steps on tiny data, and its checkpoint then reloads on one process
in `vitx validate` (whose val/loss is the one the run logged with the same weights: same normalisation, same
model) and in `vitx analyze` (with the normalisation the run trained with; a CNN has no attention to analyse, and
analyze must refuse it with a message, not a traceback).

Families: ViT conf/vit/pretrain.yaml, DeiT conf/deit/distill-shapes.yaml (its teacher: the shipped CNN teacher's
one-step run), CLIP conf/clip/demo.yaml, CNN conf/cnn/teacher-shapes.yaml.

Overlays (every file of conf/trainer/ is in one of these lists; a test fails when a new one is in none):
- in this process: activation_checkpointing, bf16 (where the CPU runs bf16 autocast; validated under bf16 too, so
  the losses compare), compile (the shipped backend, inductor: it generates and compiles C++ for every block, some
  10-40 s per family on a cold cache, so these are marked slow), grad_accum (2 steps are 8 batches);
- fp16: skipped while Lightning does not run fp16 on a CPU. Lightning 2.6 turns
  `Trainer(accelerator="cpu", precision="16-mixed")` into bf16-mixed with a warning, so the run would test bf16
  again and not fp16's gradient scaler; fp16 is checked on a GPU. The skip is decided by asking Lightning, so the
  test runs by itself once Lightning supports it;
- on 2 processes (gloo), one torchrun per overlay running the four families one after the other
  (tests/matrix/_worker.py): ddp, fsdp. Their val/loss (each rank validates half of the 16 images) is compared
  with one process validating all 16, except CLIP's, whose contrastive loss depends on which rows share a batch;
- debug (fast_dev_run): one training and one validation batch, and by design no checkpoint or log to reload:
  checked to run and to write none;
- excluded, see EXCLUDED: fsdp-classic (Lightning's FSDP1 strategy refuses a CPU) and multinode (2 nodes of GPUs).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.matrix._runs import (
    FAMILIES,
    REPO,
    TRAINER,
    analyze,
    assert_analyzed_with,
    fit_args,
    has_vit,
    is_image_text,
    last_checkpoint,
    scalars,
    the_run,
    trained_normalization,
    validate_args,
    vitx,
)

pytestmark = pytest.mark.matrix

STEPS = 2
ONE_PROCESS = ["activation_checkpointing", "bf16", "compile", "fp16", "grad_accum"]
TWO_PROCESSES = ["ddp", "fsdp"]
RUN_ONLY = ["debug"]
EXCLUDED = {
    "fsdp-classic": "Lightning's FSDPStrategy (FSDP1) refuses a CPU: 'The strategy `fsdp` requires a GPU "
                    "accelerator'; the overlay is for GPU clusters (accelerator: gpu), and FSDP2 (fsdp.yaml) is in "
                    "the matrix",
    "multinode": "2 nodes x 8 GPUs; its strategy (ddp) is in the matrix through ddp.yaml",
}
PRECISION_OVERLAYS = {"bf16", "fp16"}  # stacked on `vitx validate` too, so that the two losses compare
LAUNCH_TIMEOUT_S = 300


def val_tolerance(overlay: str) -> float:
    """Relative tolerance between the val/loss the run logged and the one `vitx validate` gets on its checkpoint."""
    return {"compile": 1e-3, "bf16": 1e-3, "fp16": 1e-3}.get(overlay, 1e-4)


# -- what this CPU and this Lightning can run -----------------------------------------------------------------


def cpu_runs_bf16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except Exception:  # noqa: BLE001
        return False


def lightning_runs_fp16_on_cpu() -> bool:
    import lightning as L

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(accelerator="cpu", devices=1, precision="16-mixed", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.precision == "16-mixed"


def skip_unless_the_cpu_runs(overlay: str) -> None:
    if overlay == "bf16" and not cpu_runs_bf16_autocast():
        pytest.skip("this CPU build of torch does not run bf16 autocast")
    if overlay == "fp16" and not lightning_runs_fp16_on_cpu():
        pytest.skip("Lightning runs no fp16 AMP on a CPU: Trainer(accelerator='cpu', precision='16-mixed') falls back "
                    "to bf16-mixed, which the bf16 cells test; fp16 and its gradient scaler need a GPU")


# -- the runs, each once per session ----------------------------------------------------------------------------


class OverlayRuns:
    """The runs folder of `vitx fit` of (overlay, family); the 2-process overlays launch all families at once."""

    def __init__(self, tmp_path_factory, shipped) -> None:
        self.tmp, self.shipped = tmp_path_factory, shipped
        self.done: dict[tuple[str, str], Path | BaseException] = {}
        self.launched: dict[str, Path] = {}

    def fit(self, overlay: str, family: str) -> Path:
        key = (overlay, family)
        if key not in self.done:
            if overlay in TWO_PROCESSES:
                self._launch(overlay)
            else:
                runs = self.tmp.mktemp(f"{overlay}-{family}")
                config = FAMILIES[family]
                try:
                    vitx(fit_args(config, self.shipped.inputs(config), runs, [overlay], steps=STEPS))
                    self.done[key] = runs
                except BaseException as err:  # noqa: BLE001 - kept for the validate and analyze tests
                    self.done[key] = err
                    raise
        result = self.done[key]
        if isinstance(result, BaseException):
            raise RuntimeError(f"`vitx fit` of {family} with {overlay}.yaml failed: {type(result).__name__}: "
                               f"{str(result)[:3000]}") from result
        return result

    def _launch(self, overlay: str) -> None:
        """One torchrun of 2 processes that fits every family under `overlay`, one after the other."""
        folder = self.tmp.mktemp(f"{overlay}-2proc")
        jobs, runs = [], {}
        for family, config in FAMILIES.items():
            try:
                inputs = self.shipped.inputs(config)
            except BaseException as err:  # noqa: BLE001 - e.g. DeiT's teacher run failed
                self.done[(overlay, family)] = err
                continue
            runs[family] = folder / family
            jobs.append({"name": family, "argv": fit_args(config, inputs, runs[family], [overlay], steps=STEPS,
                                                          devices=2)})
        (folder / "jobs.json").write_text(json.dumps(jobs))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tests.matrix._worker", str(folder / "jobs.json")]
        try:
            proc = subprocess.run(cmd, cwd=folder, env=env, timeout=LAUNCH_TIMEOUT_S, capture_output=True, text=True)
            tail = (proc.stdout[-2000:] + proc.stderr[-4000:]) if proc.returncode else ""
        except subprocess.TimeoutExpired:
            tail = f"the 2-process launch did not finish within {LAUNCH_TIMEOUT_S} s (a hang at a collective?)"
        for family, folder_of_run in runs.items():
            outcomes = [folder / f"{family}.rank{r}.json" for r in (0, 1)]
            if not all(p.is_file() for p in outcomes):
                self.done[(overlay, family)] = RuntimeError(f"no outcome from both ranks; torchrun said:\n{tail}")
                continue
            failed = [o for o in map(json.loads, (p.read_text() for p in outcomes)) if not o["ok"]]
            self.done[(overlay, family)] = (
                RuntimeError(f"{failed[0]['error']}\n{failed[0]['traceback']}") if failed else folder_of_run)


@pytest.fixture(scope="session")
def overlay_runs(tmp_path_factory, shipped) -> OverlayRuns:
    return OverlayRuns(tmp_path_factory, shipped)


MATRIX = [
    pytest.param(overlay, family, id=f"{overlay}-{family}",
                 marks=[pytest.mark.slow] if overlay == "compile" else [])
    for overlay in ONE_PROCESS + TWO_PROCESSES for family in FAMILIES
]


# -- the tests --------------------------------------------------------------------------------------------------


def test_every_overlay_is_in_the_matrix_or_excluded_with_a_reason():
    shipped = {p.stem for p in TRAINER.glob("*.yaml")}
    listed = set(ONE_PROCESS) | set(TWO_PROCESSES) | set(RUN_ONLY) | set(EXCLUDED)
    assert shipped == listed, f"overlays not in the matrix: {sorted(shipped - listed)}; gone: {sorted(listed - shipped)}"


@pytest.mark.parametrize("overlay, family", MATRIX)
def test_overlay_trains(overlay, family, overlay_runs):
    skip_unless_the_cpu_runs(overlay)
    ckpt = torch.load(last_checkpoint(overlay_runs.fit(overlay, family)), map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS


@pytest.mark.parametrize("overlay, family", MATRIX)
def test_checkpoint_validates_on_one_process(overlay, family, overlay_runs, shipped, tmp_path):
    skip_unless_the_cpu_runs(overlay)
    runs = overlay_runs.fit(overlay, family)
    config = FAMILIES[family]
    precision = [overlay] if overlay in PRECISION_OVERLAYS else []
    vitx(validate_args(config, shipped.inputs(config), tmp_path, last_checkpoint(runs), precision))
    (validated,) = scalars(the_run(tmp_path), "val/loss")
    assert math.isfinite(validated)
    if overlay in TWO_PROCESSES and is_image_text(config):
        return  # a contrastive loss depends on which rows share a batch: 2 ranks of 8 are not 2 batches of 8
    logged = scalars(the_run(runs), "val/loss")[-1]  # at the end of the run, with the checkpoint's weights
    assert validated == pytest.approx(logged, rel=val_tolerance(overlay)), (
        f"validate on the checkpoint gives val/loss {validated}, the run logged {logged} with the same weights")


@pytest.mark.parametrize("overlay, family", MATRIX)
def test_checkpoint_analyzes(overlay, family, overlay_runs, shipped, corpora, tmp_path):
    skip_unless_the_cpu_runs(overlay)
    config = FAMILIES[family]
    ckpt = last_checkpoint(overlay_runs.fit(overlay, family))
    images = corpora.captions if is_image_text(config) else corpora.shapes
    code, out, err = analyze(ckpt, images, tmp_path)
    if has_vit(config):
        assert code == 0, err
        assert_analyzed_with(tmp_path, err, *trained_normalization(config))
    else:  # a ResNet: a clear refusal that says what analyze needs
        assert code != 0, f"analyze accepted a checkpoint with no ViT:\n{out}"
        assert "Traceback" not in err and err.strip().startswith("vitx analyze:"), err
        assert re.search(r"ViT|vision transformer", err, re.IGNORECASE), err


@pytest.mark.parametrize("family", FAMILIES)
def test_debug_overlay_runs_a_batch_and_writes_nothing(family, shipped, tmp_path):
    config = FAMILIES[family]
    vitx(fit_args(config, shipped.inputs(config), tmp_path, ["debug"], steps=STEPS))
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert not [p for p in written if p.endswith(".ckpt") or "tfevents" in p], written
