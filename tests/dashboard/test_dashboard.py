"""What TensorBoard shows of a short `vitx fit` of the shipped default experiment, read back from its event files
without a browser (tools/dashboard_check.py looks at the same in Chromium): the tag hierarchy, the labelled
images, the custom-scalars layout, the HParams session and its metrics, the config and summary texts; the
`analysis:` flags; the terminal's progress bar and summary."""
from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import REPO
from vit_experiments.cli import VitxCLI

PRETRAIN = str(REPO / "conf" / "vit" / "pretrain.yaml")
TEACHER = str(REPO / "conf" / "cnn" / "teacher-shapes.yaml")
GROUPS = ("train", "val", "analysis", "data", "perf")


def fit(config: str, shapes: Path, runs: Path, *extra: str) -> VitxCLI:
    return VitxCLI(args=[
        "fit", "--config", config,
        "--data.train_shards", str(shapes / "train-{000000..000003}.tar"),
        "--data.val_shards", str(shapes / "val-000000.tar"), "--data.synthesize_if_missing", "false",
        "--data.batch_size", "32", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(runs), "--trainer.log_every_n_steps", "1",
        "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0", *extra])


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def vit_run(tiny_shapes, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cli = fit(PRETRAIN, tiny_shapes, runs,
              "--model.vit.image_size", "16", "--model.vit.embed_dim", "32", "--model.vit.depth", "2",
              "--model.vit.num_heads", "2", "--model.vit.mlp_dim", "64", "--trainer.callbacks.window_size", "2",
              # the analysis' own flags: every 4 of the 8 steps, on 4 images, not at the start
              "--analysis.every_n_steps", "4", "--analysis.every_n_epochs", "0", "--analysis.num_images", "4",
              "--analysis.at_start", "false")
    (run,) = runs.glob("vit-pretrain/version_*")
    return cli, run, events(run)


def test_tags_are_tidy(vit_run):
    _, _, acc = vit_run
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/acc1", "train/lr", "val/loss", "val/acc1", "val/acc5",
                "analysis/attention_distance/layer_01", "analysis/attention_distance/layer_02",
                "analysis/prefix_attention/layer_01", "analysis/position_embedding/topology_score",
                "perf/train_images_per_sec", "perf/analysis_seconds", "data/train_samples_read"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert not tags & {"hp_metric", "epoch", "train/batches", "train/samples", "train/time", "lr-AdamW/pg1"}
    assert {t.split("/")[0] for t in tags} <= set(GROUPS), sorted(tags)
    # --analysis.every_n_steps 4 of one 8-step epoch (at_end adds nothing at step 8)
    assert [e.step for e in acc.Scalars("analysis/attention_distance/layer_01")] == [4, 8]


def test_images_are_the_labelled_figures(vit_run):
    _, run, acc = vit_run
    for tag in ("analysis/attention_distance", "analysis/position_similarity", "analysis/rollout",
                "analysis/patch_filters"):
        image = acc.Images(tag)[-1]
        assert image.width >= 400 and image.height >= 150, (tag, image.width, image.height)
    assert all(t.startswith("analysis/") for t in acc.Tags()["images"])
    assert list(run.glob("analysis/step_000008/*.png"))  # and the same figures as files


def _layout(acc: EventAccumulator) -> dict:
    (event,) = acc.Tensors("custom_scalars__config__")[-1:]
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}


def test_custom_scalars_layout(vit_run):
    import re

    _, _, acc = vit_run
    layout = _layout(acc)
    assert list(layout)[0] == "train and val"
    assert layout["train and val"]["loss"] == [r"^(train|val)/loss$"]
    assert "top-1 accuracy" in layout["train and val"]
    per_layer = layout["analysis: every layer"]
    (regex,) = per_layer["attention_distance per layer"]
    tags = set(acc.Tags()["scalars"])
    # one chart, every layer
    assert {t for t in tags if re.match(regex, t)} == {"analysis/attention_distance/layer_01",
                                                      "analysis/attention_distance/layer_02"}
    assert "prefix_attention per layer" in per_layer
    # every per-layer analysis the run logged has its chart
    names = {t.split("/")[1] for t in tags if re.match(r"^analysis/[^/]+/layer_\d+$", t)}
    assert {f"{n} per layer" for n in names} == set(per_layer)


def test_hparams_session_has_the_experiment_and_its_metrics(vit_run):
    _, _, acc = vit_run
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert {"val/acc1", "val/acc5", "val/loss", "train/loss"} <= set(metrics)
    # TensorBoard sorts the columns by name: the names keep vitx's order, the columns show the plain names
    shown = [h.display_name for h in sorted(experiment.hparam_infos, key=lambda h: h.name)]
    assert shown[:5] == ["model", "params_M", "lr", "global_batch", "precision"]
    assert not [n for n in shown if n.startswith("_")]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hp = {k.split(".", 1)[1]: v.number_value if v.HasField("number_value") else v.string_value
          for k, v in start.hparams.items()}
    assert hp["model"] == "ViT 2x32 h2 p4 16px"
    assert hp["lr"] == pytest.approx(1e-3) and hp["batch_size"] == 32 and hp["global_batch"] == 32
    assert hp["devices"] == 1 and hp["precision"] == "32-true" and hp["strategy"] == "SingleDeviceStrategy"
    assert hp["vit.embed_dim"] == 32 and hp["vit.depth"] == 2 and hp["params_M"] > 0


def test_config_and_run_summary_texts(vit_run):
    cli, run, acc = vit_run
    texts = {t.rsplit("/", 1)[0] for t in acc.Tags()["tensors"] if t.endswith("/text_summary")}
    assert texts == {"run/config", "run/summary"}
    config = acc.Tensors("run/config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "embed_dim: 32" in config and "every_n_steps: 4" in config
    summary = acc.Tensors("run/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    best = cli.trainer.checkpoint_callback.best_model_path
    assert "best val/acc1 = " in summary and best in summary and "images/s" in summary
    assert "attention analysis: 2 runs" in summary and "FLOPs per image" in summary
    assert "in 8 steps (1.00 epochs)" in summary  # the one epoch of 8 batches, counted from the steps


def test_terminal_progress_bar_and_summary(vit_run, capsys):
    cli, _, _ = vit_run
    bar = cli.trainer.progress_bar_callback
    assert bar.images_per_sec and bar.images_per_sec > 0
    assert "v_num" not in bar.get_metrics(cli.trainer, cli.model)
    summary = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ModelSummary"]
    assert summary and summary[0].flops_per_image > 0  # not Lightning's "Total FLOPs: 0"


def test_analysis_off_for_the_resnet_teacher_and_by_flag(tiny_shapes, tmp_path):
    """The shipped CNN teacher turns the analysis off (a ResNet has no attention); `--analysis.enabled false` does
    the same for a ViT. Both still get the dashboard."""
    one_step = ("--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                "--trainer.enable_progress_bar", "false")
    fit(TEACHER, tiny_shapes, tmp_path / "cnn", "--model.resnet.image_size", "16", *one_step)
    fit(PRETRAIN, tiny_shapes, tmp_path / "vit", "--model.vit.image_size", "16", "--model.vit.depth", "1",
        "--model.vit.embed_dim", "32", "--model.vit.num_heads", "2", "--model.vit.mlp_dim", "64",
        "--analysis.enabled", "false", *one_step)
    for run in (*tmp_path.glob("cnn/*/version_*"), *tmp_path.glob("vit/*/version_*")):
        acc = events(run)
        assert not [t for t in acc.Tags()["scalars"] if t.startswith("analysis/")]
        assert not (run / "analysis").exists()
        assert "val/acc1" in acc.Tags()["scalars"] and _layout(acc)["train and val"]
