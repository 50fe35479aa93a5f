"""A `--config` given as a pipe (`vitx fit --config <(...)`, i.e. /dev/fd/N): read once, by the process that was
given it, and still what every part of the run sees: the interruption message's resume command (which names the
run's saved config.yaml, since the pipe is gone) and the processes a DDP launcher starts (which have no such
descriptor)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.test_failures import PRETRAIN, args
from tests.conftest import REPO
from vit_experiments.callbacks.run_guard import NonFiniteLossError
from vit_experiments.cli import inline_piped_configs, main


def pipe_with(text: str) -> int:
    """The read end of a pipe that holds `text` (small enough for the pipe's buffer), its write end closed."""
    r, w = os.pipe()
    os.write(w, text.encode())
    os.close(w)
    return r


def with_piped_config(argv: list[str], fd: int) -> list[str]:
    i = argv.index("--config")
    return argv[: i + 1] + [f"/dev/fd/{fd}"] + argv[i + 2:]


def test_a_piped_config_is_read_once_and_passed_on_as_its_content():
    text = Path(PRETRAIN).read_text()
    fd = pipe_with(text)
    try:
        out, piped = inline_piped_configs(["fit", "--config", f"/dev/fd/{fd}", "--config", PRETRAIN])
    finally:
        os.close(fd)
    assert out == ["fit", "--config", text, "--config", PRETRAIN] and piped == {2: f"/dev/fd/{fd}"}


def test_the_resume_command_of_a_piped_run_names_its_saved_config(tiny_shapes, tmp_path, capsys):
    fd = pipe_with(Path(PRETRAIN).read_text())
    try:
        with pytest.raises(NonFiniteLossError):
            main(with_piped_config(args(tiny_shapes, tmp_path, "--model.optim.lr", "1e6",
                                        "--model.optim.warmup_steps", "0", "--trainer.max_epochs", "3"), fd))
    finally:
        os.close(fd)
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("Resume with:")]
    (saved,) = tmp_path.rglob("config.yaml")
    assert "/dev/fd/" not in line and f"--config {saved}" in line, line


@pytest.mark.slow
def test_a_piped_config_reaches_the_processes_ddp_starts(tiny_shapes, tmp_path):
    """Before: the second rank, started by Lightning with the same command line, found no /dev/fd/N, stopped with
    'File does not exist', and the first waited for it for ever."""
    fd = pipe_with(Path(PRETRAIN).read_text())
    argv = with_piped_config(args(tiny_shapes, tmp_path, "--config", str(REPO / "conf" / "trainer" / "ddp.yaml"),
                                  "--trainer.devices", "2", "--trainer.max_steps", "2"), fd)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vit_experiments.cli", *argv], cwd=tmp_path, env=env,
                            pass_fds=(fd,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    os.close(fd)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the DDP run hung:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    (last,) = tmp_path.rglob("last.ckpt")

    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
