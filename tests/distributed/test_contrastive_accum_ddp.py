"""Feature-cached gradient accumulation of CLIP on 2 real processes (gloo, CPU): `vitx fit` of the shipped
ContrastivePretraining with conf/trainer/grad_accum.yaml (4 micro-batches) stacked with conf/trainer/ddp.yaml or
conf/trainer/fsdp.yaml, 2 pairs per process per micro-batch, against one process taking the same 16 pairs as one
batch: the same loss, every parameter's gradient, learning rate and parameters at every step (local and
whole-matrix loss). Under DDP the gradients are all-reduced once per optimizer step (the earlier micro-batches
under no_sync), as often as in a run without accumulation.

The 2-process runs share one torchrun launch (tests.distributed._scaling runs the `vitx` jobs one after the other).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.conftest import REPO
from tests.distributed._contrastive_accum import experiment, steps_of

TRAINER = REPO / "conf" / "trainer"
ACCUM = 4  # conf/trainer/grad_accum.yaml
DEADLINE_S = 300
# reduction order differs between 1 and 2 processes and between one batch and 4 micro-batches
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
PARAM_TOL = dict(rtol=0, atol=2e-5)


def write(tmp: Path, name: str, split: int, **kwargs) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp, name, split, **kwargs)))
    return path


def fit(config: Path, *overlays: str, extra: tuple = ()) -> list[str]:
    args = ["fit", "--config", str(config)]
    for overlay in overlays:
        args += ["--config", str(TRAINER / f"{overlay}.yaml")]
    return args + ["--trainer.accelerator", "cpu", "--trainer.devices", "2", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from vit_experiments.cli import main

    tmp = tmp_path_factory.mktemp("accum")
    torch.set_num_threads(1)
    main(["fit", "--config", str(write(tmp, "single", split=1))])
    main(["fit", "--config", str(write(tmp, "single-whole", split=1)), "--model.init_args.local_loss", "false"])
    jobs = [
        fit(write(tmp, "ddp-accum", split=ACCUM), "ddp", "grad_accum"),
        fit(write(tmp, "ddp-accum-whole", split=ACCUM), "ddp", "grad_accum",
            extra=("--model.init_args.local_loss", "false")),
        fit(write(tmp, "ddp-plain", split=1), "ddp"),  # the all-reduces of a step without accumulation
        fit(write(tmp, "fsdp-accum", split=ACCUM), "fsdp", "grad_accum"),
    ]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.distributed._scaling", str(tmp / "jobs.json")]
    try:
        proc = subprocess.run(cmd, cwd=tmp, env=env, timeout=DEADLINE_S, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-process runs did not finish within {DEADLINE_S} s (processes hanging at a collective?)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (tmp / "stdout.txt").write_text(proc.stdout)
    return tmp


def assert_same_steps(reference: list[dict], run: list[dict]) -> None:
    assert [s["step"] for s in run] == [s["step"] for s in reference] == [1, 2]
    for ref, got in zip(reference, run):
        assert got["contrastive_batch"] == ref["contrastive_batch"] == 16.0  # 2 pairs x 2 processes x 4
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        assert got["lr"] == pytest.approx(ref["lr"])
        assert set(got["grads"]) == set(ref["grads"]) == set(ref["params"])  # every parameter has a gradient
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, **GRAD_TOL,
                                       msg=lambda m, n=name, s=ref["step"]: f"gradient of {n} at step {s}: {m}")
    # after the first step, every parameter entry that had a gradient above rounding: AdamW's first step is about
    # lr * sign(gradient), so an entry whose gradient is zero but for rounding (the key projection's bias, which
    # softmax ignores) moves by +-lr in either run at random
    first = reference[0]
    for name, value in first["params"].items():
        moved = first["grads"][name].abs() > 1e-5
        torch.testing.assert_close(run[0]["params"][name][moved], value[moved], **PARAM_TOL,
                                   msg=lambda m, n=name: f"{n} after the first step: {m}")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
@pytest.mark.parametrize("run, reference", [("ddp-accum", "single"), ("ddp-accum-whole", "single-whole"),
                                            ("fsdp-accum", "single")])
def test_accumulation_on_two_processes_equals_one_process_with_the_whole_batch(runs, run, reference):
    assert_same_steps(steps_of(runs / f"{reference}.pt"), steps_of(runs / f"{run}.pt"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_reduces_gradients_once_per_optimizer_step(runs):
    accum, plain = steps_of(runs / "ddp-accum.pt"), steps_of(runs / "ddp-plain.pt")
    assert all(s["allreduces"] > 0 for s in plain)  # the buckets of one synchronised backward (DDP re-buckets
    assert [s["allreduces"] for s in accum] == [s["allreduces"] for s in plain]  # after step 1), not 4 times that
    stdout = (runs / "stdout.txt").read_text()
    said = ("contrastive batch: 16 pairs per optimizer step (2 per device x 2 devices x 4 accumulated micro-batches); "
            "feature-cached accumulation")
    assert stdout.count(said) == 3  # once per accumulating run (of 3)
    assert "contrastive batch: 16 pairs per optimizer step (8 per device x 2 devices)\n" in stdout
