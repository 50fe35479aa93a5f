"""Faults injected into real training processes (tests/callbacks/_train.py, every run guard on, as the CLI adds
them): SIGTERM and Ctrl-C save a loadable last.ckpt, print how to resume and exit non-zero, and the saved state
resumes; SLURM's requeue signal leaves Lightning's hpc checkpoint and calls `scontrol requeue`; under DDP on 2
gloo processes a NaN seen by rank 1 alone stops both ranks at the same step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # each test starts Lightning in one or two fresh processes
TIMEOUT = 180  # seconds for a whole run; the 2 cores are shared


def launch(root: Path, *args: str, env: dict | None = None, nproc: int = 1) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.callbacks._train", "--root", str(root), *args]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                    "tests.callbacks._train"]
    log = open(root / "log.txt", "w")
    return subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})})


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path.name} never appeared (exit {proc.returncode}):\n{(path.parent / 'log.txt').read_text()[-3000:]}")
        time.sleep(0.1)


def finish(proc: subprocess.Popen, root: Path) -> tuple[int, str]:
    try:
        rc = proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not stop:\n{(root / 'log.txt').read_text()[-3000:]}")
    return rc, (root / "log.txt").read_text()


def result(root: Path, rank: int = 0) -> dict:
    return json.loads((root / f"result-{rank}.json").read_text())


def slow_run(root: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return launch(root, "--max-epochs", "1000", "--step-sleep", "0.05", "--ready-step", "6", *extra, env=env)


def test_sigterm_saves_last_says_how_to_resume_and_the_state_resumes(tmp_path):
    root = tmp_path / "run"
    proc = slow_run(root)
    wait_for(root / "ready", proc)
    os.kill(proc.pid, signal.SIGTERM)
    rc, log = finish(proc, root)
    assert rc == 128 + signal.SIGTERM, log
    last = root / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    stopped = result(root)["global_step"]
    assert state["global_step"] == stopped >= 6 and result(root)["exception"] == "SIGTERMException"
    assert f"Resume with: python -m tests.callbacks._train --root {root} --ckpt_path {last}" in log

    # resumed, it continues from the next step and finishes cleanly
    more = launch(root, "--max-epochs", str(state["epoch"] + 2), "--ckpt-path", str(last))
    rc, log = finish(more, root)
    assert rc == 0, log
    assert result(root)["steps_run"][0] == stopped and result(root)["global_step"] == 4 * (state["epoch"] + 2)


def test_ctrl_c_to_the_process_group_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    """As Ctrl-C in a terminal: SIGINT to the trainer and its dataloader worker alike."""
    root = tmp_path / "run"
    proc = slow_run(root, "--workers", "1")
    wait_for(root / "ready", proc)
    os.killpg(proc.pid, signal.SIGINT)
    rc, log = finish(proc, root)
    assert rc == 128 + signal.SIGINT, log
    state = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)
    assert state["global_step"] == result(root)["global_step"] == len(result(root)["steps_run"])  # a whole step
    assert "by SIGINT" in log and "Saved the newest state to" in log


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    root = tmp_path / "run"
    proc = launch(root, "--max-epochs", "1000", "--step-sleep", "1.0", "--ready-step", "1")
    wait_for(root / "ready", proc)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.2)  # still inside the 1-second step
    os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, root)
    assert rc == 1 and "No checkpoint saved: stopped at once by a second Ctrl-C" in log, log
    assert "There is no checkpoint to resume from" in log  # step 1: the first epoch-end save is at step 4
    assert not (root / "ckpt").exists() or not list((root / "ckpt").iterdir())


def test_slurm_requeue_signal_saves_a_checkpoint_and_requeues(tmp_path):
    root = tmp_path / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.txt'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "vitx", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = slow_run(root, "--slurm", env=slurm)
    wait_for(root / "ready", proc)
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for(tmp_path / "scontrol.txt", proc)
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    hpc = root / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, weights_only=True)["global_step"] >= 6
    os.kill(proc.pid, signal.SIGTERM)  # what SLURM sends next
    rc, log = finish(proc, root)
    assert rc == 128 + signal.SIGTERM, log
    assert torch.load(root / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == result(root)["global_step"]
    assert not [p for p in root.rglob("*.tmp")]  # no partial file left by either save


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_a_nan_on_rank_1_only_stops_both_ranks_at_the_same_step(tmp_path):
    root = tmp_path / "run"
    # 32 samples over 2 ranks, batch 8: 2 steps per epoch; the NaN at step 3 is in epoch 1
    proc = launch(root, "--max-epochs", "5", "--nan-steps", "3", "--nan-rank", "1", nproc=2)
    rc, log = finish(proc, root)
    assert rc != 0, log
    r0, r1 = result(root, 0), result(root, 1)
    assert r0["exception"] == r1["exception"] == "NonFiniteLossError", log
    assert r0["global_step"] == r1["global_step"] == 3 and r0["steps_run"][-1] == r1["steps_run"][-1] == 3
    assert "at step 3 (epoch 1)" in r0["message"] and "Last good checkpoint:" in r0["message"]
    state = torch.load(root / "ckpt" / "last.ckpt", weights_only=True)  # both ranks joined the save
    assert state["global_step"] == 3 and all(torch.isfinite(v).all() for v in state["state_dict"].values())
