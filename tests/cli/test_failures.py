"""When runs fail, through the real `vitx fit` with the shipped default experiment on tiny shards: a non-finite
loss stops the run and leaves no non-finite checkpoint, a run that trains nothing exits non-zero, `last.ckpt` is
the newest state even when the monitored metric gets worse, SIGTERM leaves a checkpoint and a resume command, and
`--ckpt_path last` resumes it in the same run directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from vit_experiments.callbacks.run_guard import NonFiniteLossError, NoTrainingProgressError
from vit_experiments.cli import main

PRETRAIN = str(REPO / "conf" / "vit" / "pretrain.yaml")


def args(shapes: Path, runs: Path, *extra: str, train: str = "train-{000000..000003}.tar") -> list[str]:
    return ["fit", "--config", PRETRAIN,
            "--data.train_shards", str(shapes / train), "--data.val_shards", str(shapes / "val-000000.tar"),
            "--data.synthesize_if_missing", "false", "--data.batch_size", "16", "--data.num_workers", "0",
            "--model.vit.image_size", "16", "--model.vit.embed_dim", "16", "--model.vit.depth", "1",
            "--model.vit.num_heads", "2", "--model.vit.mlp_dim", "32",
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", *extra]


def test_a_nonfinite_loss_stops_the_run_and_saves_no_nonfinite_model(tiny_shapes, tmp_path):
    with pytest.raises(NonFiniteLossError, match="step"):
        main(args(tiny_shapes, tmp_path, "--model.optim.lr", "1e6", "--model.optim.warmup_steps", "0",
                  "--trainer.max_epochs", "3"))
    for path in tmp_path.rglob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_a_run_that_trains_nothing_fails(tiny_shapes, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(2):
        (empty / f"train-{i:06d}.tar").write_bytes(b"")  # zero-byte shards, no size file
    with pytest.raises((NoTrainingProgressError, ValueError, RuntimeError)):
        main(args(tiny_shapes, tmp_path / "runs", "--trainer.max_epochs", "2",
                  "--data.train_shards", str(empty / "train-{000000..000001}.tar")))


def test_last_is_the_newest_state_when_the_metric_stops_improving(tiny_shapes, tmp_path):
    main(args(tiny_shapes, tmp_path, "--model.optim.lr", "1e-12", "--trainer.max_epochs", "3",
              "--trainer.limit_train_batches", "2"))
    (last,) = tmp_path.rglob("last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 6


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_last_resumes_it_in_the_same_run(tiny_shapes, tmp_path):
    cmd = [sys.executable, "-m", "vit_experiments.cli",
           *args(tiny_shapes, tmp_path, "--trainer.max_epochs", "1000", "--trainer.limit_train_batches", "4")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.rglob("last.ckpt")):
        time.sleep(0.5)
    assert list(tmp_path.rglob("last.ckpt")), "the run saved no checkpoint within 120 s"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    assert "--ckpt_path" in out, out[-2000:]  # says how to resume
    (last,) = tmp_path.rglob("last.ckpt")
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert stopped_at > 0

    # the pre-emption recipe: the same command with --ckpt_path last continues that run, in its directory
    main(args(tiny_shapes, tmp_path, "--trainer.max_steps", str(stopped_at + 2), "--trainer.max_epochs", "1000",
              "--trainer.limit_train_batches", "4", "--ckpt_path", "last"))
    versions = sorted(p.name for p in (tmp_path / "vit-pretrain").iterdir())
    assert versions == ["version_0"]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == stopped_at + 2
