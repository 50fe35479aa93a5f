"""An interrupted `vitx fit` saves its checkpoint first, then the analysis callback's final analysis of the weights
it stopped with (issue 14, "Interruption"); here the stop is a non-finite loss, which every process makes at the
same step. SIGTERM and Ctrl-C take the same path: tests/analysis/test_callback.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.cli.test_failures import args
from vit_experiments.callbacks.run_guard import NonFiniteLossError
from vit_experiments.cli import main


def test_a_stopped_fit_saves_its_checkpoint_then_its_final_analysis(tiny_shapes, tmp_path):
    with pytest.raises(NonFiniteLossError):
        main(args(tiny_shapes, tmp_path, "--model.optim.lr", "1e6", "--model.optim.warmup_steps", "0",
                  "--trainer.max_epochs", "3"))
    (run,) = (tmp_path / "vit-pretrain").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert stopped_at > 0
    final = run / "analysis" / f"step_{stopped_at:06d}" / "analysis.json"
    assert json.loads(final.read_text())["step"] == stopped_at
    assert os.path.getmtime(last) <= os.path.getmtime(final)  # the checkpoint first
