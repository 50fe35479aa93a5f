"""Every experiment shipped under conf/ (all but the overlays in conf/trainer/) runs as shipped: `vitx fit` builds
its task, data module, trainer and callbacks from the YAML file, with only the data (tiny corpora written by the
shard writers), batch size, step count, device and log folder overridden on the command line, takes an optimiser
step on the CPU, validates, and writes a checkpoint. A config added under conf/ is covered by being there.

The DeiT students distil from the shipped CNN teacher's one-step run, and fine-tuning starts from the shipped
pretraining run's checkpoint (tests/matrix/conftest.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.matrix._runs import (
    CONF,
    analyze,
    assert_analyzed_with,
    experiment,
    has_vit,
    is_image_text,
    last_checkpoint,
    scalars,
    the_run,
    trained_normalization,
)

pytestmark = pytest.mark.matrix

EXPERIMENTS = sorted(p for p in CONF.rglob("*.yaml") if "trainer" not in p.relative_to(CONF).parts)
WITH_VIT = [p for p in EXPERIMENTS if has_vit(p)]


def flat(values) -> list[float]:
    return [v for row in values for v in flat(row)] if isinstance(values, list) else [values]


def name(path) -> str:
    return str(path.relative_to(CONF))


def test_the_experiments_are_found():
    families = {p.parent.name for p in EXPERIMENTS}
    assert {"vit", "deit", "clip", "cnn"} <= families, families


@pytest.mark.parametrize("config", EXPERIMENTS, ids=name)
def test_experiment_trains_a_step_and_writes_a_checkpoint(config, shipped):
    runs = shipped.runs(config)
    run = the_run(runs)
    ckpt = torch.load(last_checkpoint(runs), map_location="cpu", weights_only=True)
    assert ckpt["global_step"] >= 1
    assert ckpt["state_dict"], "the checkpoint holds no weights"
    assert (run / "config.yaml").is_file()
    (val_loss,) = scalars(run, "val/loss")  # validated once, at the end of the one-step epoch
    assert math.isfinite(val_loss)


@pytest.mark.parametrize("config", WITH_VIT, ids=name)
def test_experiment_with_a_vit_runs_the_attention_analysis(config, shipped):
    """README: the attention analysis (the `analysis:` section, AttentionAnalysis) is on in every shipped config with
    a ViT to analyse."""
    analysis = experiment(config).get("analysis") or {}
    assert analysis.get("enabled", True), f"{name(config)} turns the attention analysis off: {analysis}"
    run = the_run(shipped.runs(config))
    assert list(run.glob("analysis/step_*/analysis.json")), f"no analysis/step_*/analysis.json in {run}"


@pytest.mark.parametrize("config", WITH_VIT, ids=name)
def test_analyze_uses_the_normalisation_the_experiment_trained_with(config, shipped, corpora, tmp_path):
    """`vitx analyze` on the checkpoint, with no --mean/--std, gives the numbers it gives when told the mean and
    std the run trained with (the data module's preset), and does not fall back to a default."""
    ckpt = shipped.checkpoint(config)
    images = corpora.captions if is_image_text(config) else corpora.shapes
    mean, std = trained_normalization(config)
    code, out, err = analyze(ckpt, images, tmp_path / "saved")
    assert code == 0, err
    saved = assert_analyzed_with(tmp_path / "saved", err, mean, std)
    code, out, err = analyze(ckpt, images, tmp_path / "told", "--mean", *map(str, mean), "--std", *map(str, std))
    assert code == 0, err
    told = json.loads((tmp_path / "told" / "analysis.json").read_text())
    for key in ("attention_distance", "prefix_attention"):
        if key in told:
            assert flat(saved[key]) == pytest.approx(flat(told[key]), rel=1e-5, abs=1e-6), (
                f"{key}: analyze without --mean/--std used another normalisation than the run's {mean} / {std}")
