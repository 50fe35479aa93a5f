"""The shipped AttentionAnalysis logs linear probes and CKA of a labelled representation set while a model trains:
gathered from the validation batches, probes fitted and scored on disjoint halves, tags and figures in TensorBoard."""
import json
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO
from vit_experiments.analysis.probes import ridge_probe_accuracy, train_test_split
from vit_experiments.analysis.representations import LayerOutputs
from vit_experiments.callbacks.analysis import AttentionAnalysis
from vit_experiments.callbacks.representation_set import labelled_images

from ._tiny import TinyClassifier, loaders

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_labels_come_from_classification_batches_only():
    x = torch.randn(4, 3, 8, 8)
    images, labels = labelled_images((x, torch.tensor([2, -100, 0, 1])))  # DDP evaluation padding is left out
    assert labels.tolist() == [2, 0, 1] and torch.equal(images, x[[0, 2, 3]])
    ids = torch.randint(0, 50, (4, 7))  # CLIP: (images, token ids, valid): no labels, CKA only
    images, labels = labelled_images((x, ids, torch.tensor([True, True, False, True])))
    assert labels is None and torch.equal(images, x[[0, 1, 3]])  # the padding left out
    assert labelled_images((x, torch.rand(4)))[1] is None and labelled_images(x)[1] is None


def test_probes_are_scored_on_images_they_were_not_fitted_on(tmp_path):
    """Random labels: a probe scored on its own training images fits them (near 1); on the held-out half it is near
    chance (1/3). The callback's logged accuracy must be the held-out one."""
    train, val, x = loaders(n=64)
    y = val.dataset.tensors[1]
    cb = AttentionAnalysis(num_images=4, representation_images=64, every_n_epochs=1, at_start=False, at_end=False,
                           log_images=False, save_figures=False, raise_errors=True)
    module = TinyClassifier(embed_dim=64)
    L.Trainer(max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0, accelerator="cpu", devices=1,
              logger=TensorBoardLogger(str(tmp_path), name="run", version=0), enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]).fit(module, train, val)
    torch.testing.assert_close(cb._rep.images, x)  # the validation images in order, with their labels
    assert torch.equal(cb._rep.labels, y)
    resumed = AttentionAnalysis(representation_images=64)  # the set travels with the checkpoint
    resumed.load_state_dict(cb.state_dict())
    assert torch.equal(resumed._rep.images, cb._rep.images) and torch.equal(resumed._rep.labels, y)
    probe = json.loads((tmp_path / "run/version_0/analysis/step_000001/analysis.json").read_text())["probe"]
    assert probe["num_train"] == 32 and probe["num_test"] == 32 and probe["num_classes"] == 3
    held_out = probe["patch_accuracy"] + probe["cls_accuracy"]
    assert all(a < 0.75 for a in held_out), held_out
    split = train_test_split(64)
    assert not set(split.train.tolist()) & set(split.test.tolist())
    module.model.eval()
    with torch.no_grad(), LayerOutputs(module.model) as rec:
        module.model.forward_features(x)
    feats = rec.outputs[1][:, 1:].mean(1)  # (64, 64) mean patch token of layer 1
    own = ridge_probe_accuracy(feats[split.train], y[split.train], feats[split.train], y[split.train], 3)
    assert own > 0.9  # what scoring on the training half would have logged
    acc = events(tmp_path / "run" / "version_0")
    logged = acc.Scalars("analysis/probe_patch/layer_01")[-1].value
    assert abs(logged - probe["patch_accuracy"][0]) < 1e-6


def test_shipped_pretrain_config_logs_probes_and_cka(tiny_shapes, tmp_path):
    from vit_experiments.cli import VitxCLI

    cli = VitxCLI(args=[
        "fit", "--config", str(REPO / "conf" / "vit" / "pretrain.yaml"),
        "--data.train_shards", str(tiny_shapes / "train-{000000..000003}.tar"),
        "--data.val_shards", str(tiny_shapes / "val-000000.tar"), "--data.synthesize_if_missing", "false",
        "--data.batch_size", "32", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.num_sanity_val_steps", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.vit.image_size", "16", "--model.vit.embed_dim", "32", "--model.vit.depth", "2",
        "--model.vit.num_heads", "2", "--model.vit.mlp_dim", "64",
        "--analysis.representation_images", "48", "--analysis.num_images", "4"])
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, AttentionAnalysis)]
    assert cb._rep.images.dtype == torch.uint8 and cb._rep.images.shape == (48, 3, 16, 16)  # from the sanity check
    (run,) = tmp_path.glob("vit-pretrain/version_*")
    acc = events(run)
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    for name in ("probe_cls", "probe_patch", "cka_adjacent"):
        assert {f"analysis/{name}/layer_01", f"analysis/{name}/layer_02"} <= scalars, name
        # at the start (the sanity check filled the set) and after the epoch
        assert [e.step for e in acc.Scalars(f"analysis/{name}/layer_02")] == [0, 2]
    assert "perf/analysis_time_share" in scalars
    for tag in ("analysis/probe", "analysis/cka"):
        assert tag in images and acc.Images(tag)[-1].width >= 400
    record = json.loads((run / "analysis" / "step_000002" / "analysis.json").read_text())
    assert record["cka"]["num_images"] == 48 and record["cka"]["num_minibatches"] == 1
    assert record["probe"]["num_train"] == 24 and record["probe"]["num_test"] == 24
    assert record["probe"]["num_classes"] == 10 and (run / "analysis" / "step_000002" / "probe.png").exists()
