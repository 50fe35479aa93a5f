"""`vitx analyze` with a representation set: CKA within a checkpoint and against `--compare`, probes from labels
(class sub-folders of an image folder; `cls` members of shards)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vit_experiments.analyze import main_analyze
from vit_experiments.models.vit import ViTConfig
from vit_experiments.probe_set import load_probe_set

CFG = dict(variant=None, image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=2)


def class_folder(root, per_class=20):
    """Two classes: dark images and red ones, linearly apart in pixel space."""
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("dark", "red")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = torch.randint(0, 60, (16, 16, 3), generator=g, dtype=torch.uint8)
            if c == 1:
                img[..., 0] = 200 + img[..., 0] // 2
            Image.fromarray(img.numpy()).save(root / name / f"{i:03d}.png")
    return root


def checkpoint(path, seed):
    from vit_experiments.tasks.classification import ImageClassifier

    torch.manual_seed(seed)
    task = ImageClassifier(ViTConfig(**CFG), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 0, "global_step": 5}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return str(path)


def test_class_folder_round_robin_and_shard_labels(tmp_path, tiny_shapes):
    folder = class_folder(tmp_path / "imgs", per_class=3)
    probe = load_probe_set(str(folder), 5)
    assert probe.labels == [0, 1, 0, 1, 0] and probe.class_names == ["dark", "red"]
    assert [n.split("/")[0] for n, _ in probe.items] == ["dark", "red", "dark", "red", "dark"]
    images, labels = probe.decode(8)
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 1, 0, 1, 0]
    shards = load_probe_set(str(tiny_shapes), 10)
    assert len(shards) == 10 and shards.labels is not None and len(shards.class_names) == 10
    assert load_probe_set(str(folder / "red"), 10).labels is None  # one class, no sub-folders: no labels


def test_compare_and_probes_end_to_end(tmp_path, capsys):
    folder = class_folder(tmp_path / "imgs")
    a, b = checkpoint(tmp_path / "a.ckpt", 0), checkpoint(tmp_path / "b.ckpt", 1)
    out = tmp_path / "out"
    assert main_analyze(["--ckpt", a, "--compare", b, "--images", str(folder), "--out", str(out), "--num-images", "4",
                         "--probe-images", "40", "--batch-size", "8", "--device", "cpu"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["compare"].endswith("b.ckpt")
    assert np.array(data["cka"]["within"]).shape == (3, 3) and np.array(data["cka"]["compare"]).shape == (3, 3)
    assert data["cka"]["num_images"] == 40 and data["cka"]["num_minibatches"] == 5
    probe = data["probe"]
    assert probe["num_train"] + probe["num_test"] == 40 and probe["num_classes"] == 2
    assert probe["patch_accuracy"][0] == 1.0  # red vs dark: decodable from the first block's patch tokens
    assert {"entropy", "outlier_tokens"} <= set(data)
    for name in ("attention_entropy", "outlier_tokens", "cka", "probe"):
        assert (out / f"{name}.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "CKA against --compare" in text and "linear probes (20 train / 20 test images" in text

    same = tmp_path / "same"  # a checkpoint against itself: CKA 1 on the diagonal
    assert main_analyze(["--ckpt", a, "--compare", a, "--images", str(folder), "--out", str(same), "--num-images", "4",
                         "--probe-images", "16", "--batch-size", "8", "--device", "cpu"]) == 0
    cross = np.array(json.loads((same / "analysis.json").read_text())["cka"]["compare"])
    np.testing.assert_allclose(np.diag(cross), 1.0, atol=1e-4)


def test_compare_without_a_representation_set_is_refused(tmp_path, capsys):
    folder = class_folder(tmp_path / "imgs", per_class=2)
    a = checkpoint(tmp_path / "a.ckpt", 0)
    assert main_analyze(["--ckpt", a, "--compare", a, "--images", str(folder), "--out", str(tmp_path / "o"),
                         "--probe-images", "0", "--device", "cpu"]) == 2
    assert "--compare needs a representation set" in capsys.readouterr().err
