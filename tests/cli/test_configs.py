"""Shipped configs that the CPU cannot run: every experiment and family trains under every CPU overlay in
tests/matrix; the GPU-only overlays (fp16's gradient scaling, FSDP1, two nodes of GPUs) are checked here for what
a CPU can check: that they stack on every experiment into a config LightningCLI accepts. Every config also starts
by saying the command that runs it."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from vit_experiments.cli import main

EXPERIMENTS = sorted(p for p in (REPO / "conf").rglob("*.yaml") if p.parent.name not in ("trainer", "data"))
GPU_ONLY_OVERLAYS = ["fp16.yaml", "fsdp-classic.yaml", "multinode.yaml"]


@pytest.mark.parametrize("overlay", GPU_ONLY_OVERLAYS)
@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "conf")))
def test_gpu_only_overlay_stacks_on_experiment(config, overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--config", str(REPO / "conf" / "trainer" / overlay), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert "${" not in capsys.readouterr().out  # interpolations resolved


def test_experiments_say_how_to_run_them():
    for config in EXPERIMENTS:
        head = config.read_text().split("\n\n")[0]
        assert "vitx" in head or "make" in head, f"{config} should start by saying the command that runs it"
