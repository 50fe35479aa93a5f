"""Every shipped config parses: experiments alone, and every trainer overlay stacked on every experiment."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from vit_experiments.cli import main

EXPERIMENTS = sorted(p for p in (REPO / "conf").rglob("*.yaml") if p.parent.name not in ("trainer", "data"))
OVERLAYS = sorted((REPO / "conf" / "trainer").glob("*.yaml"))


def print_config(*configs, capsys) -> str:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "conf")))
def test_experiment_config_parses(config, capsys):
    out = print_config(config, capsys=capsys)
    assert "class_path" in out and "${" not in out  # interpolations resolved


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "conf")))
def test_overlay_stacks_on_experiment(config, overlay, capsys):
    print_config(config, overlay, capsys=capsys)


def test_experiments_say_how_to_run_them():
    for config in EXPERIMENTS:
        head = config.read_text().split("\n\n")[0]
        assert "vitx" in head or "make" in head, f"{config} should start by saying the command that runs it"
