"""The tag rules on their own: the custom-scalars chart of a tag, the learning-rate and throughput names."""
from vit_experiments.callbacks.learning_rate import tidy_lr_tags
from vit_experiments.callbacks.throughput import perf_tags
from vit_experiments.loggers import chart_for, custom_scalar_layout


def test_a_new_per_layer_analysis_gets_its_own_chart_of_every_layer():
    tags = {f"analysis/attention_distance/layer_{i:02d}" for i in (1, 2, 12)}
    tags |= {"analysis/some_new_score/layer_01", "analysis/some_new_score/layer_24", "analysis/probe/layer_03/cls"}
    layout = custom_scalar_layout(tags | {"train/loss", "val/loss", "val/acc1", "perf/train_images_per_sec"})
    per_layer = layout["analysis: every layer"]
    assert per_layer["attention_distance per layer"] == [r"^analysis/attention_distance/layer_\d+$"]
    assert per_layer["some_new_score per layer"] == [r"^analysis/some_new_score/layer_\d+$"]
    assert per_layer["probe per layer (cls)"] == [r"^analysis/probe/layer_\d+/cls$"]
    assert list(layout) == ["train and val", "analysis: every layer", "perf"]  # train and val first
    assert layout["train and val"] == {"loss": [r"^(train|val)/loss$"], "top-1 accuracy": [r"^(train|val)/acc1$"]}


def test_clip_metrics_chart_by_family_and_unknown_tags_get_none():
    assert chart_for("val/zeroshot/acc1") == ("val metrics", ("val/zeroshot", (r"^val/zeroshot(/.*)?$",)))
    assert chart_for("val/retrieval/image_to_text/R@5")[1][0] == "val/retrieval"
    assert chart_for("analysis/position_embedding/topology_score")[0] == "analysis"
    assert chart_for("epoch") is None and chart_for("something/else") is None


def test_learning_rate_tags():
    assert tidy_lr_tags({"lr-AdamW/pg1": 1e-3, "lr-AdamW/pg2": 1e-3}) == {"train/lr": 1e-3}
    assert tidy_lr_tags({"lr-AdamW/pg1": 1e-3, "lr-AdamW/pg2": 5e-4}) == {"train/lr/pg1": 1e-3, "train/lr/pg2": 5e-4}
    assert tidy_lr_tags({"lr-SGD": 0.1, "lr-SGD-momentum": 0.9}) == {"train/lr": 0.1, "train/momentum": 0.9}


def test_throughput_tags():
    one = {"time": 3.0, "batches": 10, "samples": 640, "device/batches_per_sec": 2.0, "device/samples_per_sec": 128.0}
    assert perf_tags("train", one) == {"perf/train_images_per_sec_per_device": 128.0,
                                       "perf/train_images_per_sec": 128.0}
    two = {**one, "samples_per_sec": 256.0, "batches_per_sec": 4.0}
    assert perf_tags("train", two)["perf/train_images_per_sec"] == 256.0
    assert perf_tags("train", {"time": 1.0, "batches": 1, "samples": 64}) == {}  # before the window fills
