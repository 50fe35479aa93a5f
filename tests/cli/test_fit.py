"""`vitx fit` and `vitx validate` end to end on tiny shards, and the bad inputs that must fail before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, scalar_tags
from vit_experiments.cli import main

PRETRAIN = str(REPO / "conf" / "vit" / "pretrain.yaml")


def tiny_args(shapes: Path, runs: Path, *extra: str) -> list[str]:
    """The default experiment shrunk to seconds: 16-px images, one block, a few steps, no worker processes."""
    return [
        "--config", PRETRAIN,
        "--data.train_shards", str(shapes / "train-{000000..000003}.tar"),
        "--data.val_shards", str(shapes / "val-000000.tar"),
        "--data.synthesize_if_missing", "false",
        "--data.batch_size", "32",
        "--data.num_workers", "0",
        "--model.vit.image_size", "16",
        "--model.vit.embed_dim", "32",
        "--model.vit.depth", "1",
        "--model.vit.num_heads", "2",
        "--model.vit.mlp_dim", "64",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted_run(tiny_shapes, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    main(["fit", *tiny_args(tiny_shapes, runs, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
                            "--trainer.callbacks.window_size", "2")])  # the last callback: ImageThroughput
    (run_dir,) = (runs / "vit-pretrain").iterdir()
    return run_dir


def test_fit_writes_events_checkpoint_and_config(fitted_run):
    tags = scalar_tags(fitted_run)
    for tag in ("train/loss", "train/acc1", "val/loss", "val/acc1", "val/acc5", "train/lr",
                "perf/train_images_per_sec", "analysis/position_embedding/topology_score",
                "analysis/attention_distance/layer_01"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert (fitted_run / "checkpoints" / "last.ckpt").is_file()
    config = (fitted_run / "config.yaml").read_text()
    assert "image_size: 16" in config  # the resolved config, overrides included


def test_checkpoint_loads_without_pickled_objects(fitted_run):
    ckpt = torch.load(fitted_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["vit"]["image_size"] == 16
    assert ckpt["global_step"] == 256 // 32  # one epoch of the 256-image corpus


def test_validate_on_checkpoint(fitted_run, tiny_shapes, tmp_path):
    main(["validate", *tiny_args(tiny_shapes, tmp_path), "--ckpt_path", str(fitted_run / "checkpoints" / "last.ckpt")])
    (run_dir,) = (tmp_path / "vit-pretrain").iterdir()
    assert "val/acc1" in scalar_tags(run_dir)


def test_finetune_at_new_size_resamples_and_resets_head(fitted_run, tiny_shapes, tmp_path):
    """Fine-tuning the 16-px checkpoint at 24 px on a 5-way head: the pos_embed grows 4x4 -> 6x6."""
    from vit_experiments.tasks.classification import ImageClassifier
    from vit_experiments.models.vit import ViTConfig

    ckpt = fitted_run / "checkpoints" / "last.ckpt"
    cfg = ViTConfig(variant=None, image_size=24, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                    num_classes=5)
    task = ImageClassifier(cfg, init_from=str(ckpt))
    assert task.model.pos_embed.shape[1] == 1 + 36
    assert torch.count_nonzero(task.model.head.weight) == 0
    pretrained = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(task.model.blocks[0].attn.qkv.weight, pretrained["model.blocks.0.attn.qkv.weight"])


def test_missing_shards_fail_before_training_with_the_pattern(tiny_shapes, tmp_path):
    pattern = str(tmp_path / "nowhere" / "train-{000000..000003}.tar")
    with pytest.raises(Exception, match="nowhere") as info:
        main(["fit", *tiny_args(tiny_shapes, tmp_path, "--data.train_shards", pattern, "--trainer.max_steps", "1")])
    assert "vitx data" in str(info.value)  # says how to make shards


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.vit.image_size", "18"], "divisible"),
        (["--model.vit.variant", "XL/16"], "valid variants are Ti, S, B, L, H"),
        (["--model.vit.no_such_key", "1"], "no_such_key"),
    ],
    ids=["size-not-divisible", "unknown-variant", "unknown-key"],
)
def test_bad_config_fails_at_config_time(override, message, tiny_shapes, tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", *tiny_args(tiny_shapes, tmp_path, "--trainer.max_steps", "1", *override)])
    text = str(info.value) + capsys.readouterr().err
    assert message in text
    assert not (tmp_path / "vit-pretrain").exists()  # nothing trained
