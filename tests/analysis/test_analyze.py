"""`vitx analyze` (main_analyze): rebuilds the model from a checkpoint and reproduces the callback's numbers."""
import dataclasses
import json
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from vit_experiments.analyze import load_vit, main_analyze
from vit_experiments.callbacks.analysis import AttentionAnalysis
from vit_experiments.models.vit import ViTConfig, VisionTransformer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
CFG = dict(variant=None, image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)


def write_pngs(images, folder):
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")  # lossless
    return folder


def task_checkpoint(path, task, epoch=3, global_step=30):
    """What Lightning writes for a task: hyperparameters, state dict and what the task adds on saving."""
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": epoch,
            "global_step": global_step}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_reproduces_the_callback_numbers_from_the_checkpoint(tmp_path):
    from vit_experiments.tasks.classification import ImageClassifier

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (16,), generator=g)
    folder = write_pngs(x, tmp_path / "images")
    cb = AttentionAnalysis(num_images=4, every_n_epochs=0, at_start=False, at_end=True, save_figures=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu", devices=1,
                        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer.fit(ImageClassifier(ViTConfig(**CFG)), loader, loader)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    during = json.loads((tmp_path / "analysis" / "step_000002" / "analysis.json").read_text())

    out = tmp_path / "out"
    assert main_analyze(["--ckpt", str(tmp_path / "last.ckpt"), "--images", str(folder), "--out", str(out),
                         "--num-images", "4", "--device", "cpu"]) == 0
    after = json.loads((out / "analysis.json").read_text())
    assert after["global_step"] == 2 and after["image_names"] == ["000.png", "001.png", "002.png", "003.png"]
    for key in ("attention_distance", "prefix_attention", "rollout", "position_similarity"):
        np.testing.assert_allclose(after[key], during[key], atol=1e-5)
    assert after["topology_score"] == pytest.approx(during["topology_score"], abs=1e-6)
    for name in ("attention_distance", "position_similarity", "rollout", "patch_filters"):
        assert (out / f"{name}.png").exists()
    assert (out / "attention_distance.csv").read_text().count("\n") == 1 + 2 * 2


def test_shards_clip_image_tower_and_deit(tmp_path, tiny_shapes, capsys):
    from vit_experiments.models.clip import CLIPConfig
    from vit_experiments.models.text import TextConfig
    from vit_experiments.tasks.contrastive import ContrastivePretraining
    from vit_experiments.tasks.distillation import DistillationClassifier

    torch.manual_seed(0)
    clip_cfg = CLIPConfig(embed_dim=8, vision=ViTConfig(**{**CFG, "num_classes": 0}),
                          text=TextConfig(vocab_size=100, width=16, depth=1, num_heads=2))
    clip = ContrastivePretraining(clip_cfg, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ckpt = task_checkpoint(tmp_path / "clip.ckpt", clip)
    model, info = load_vit(str(ckpt))
    assert (info.epoch, info.global_step, info.family) == (3, 30, "clip")
    for k, v in clip.model.visual.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    # shards: a folder of shards (val-*.tar first) and an explicit pattern
    for images in (str(tiny_shapes), str(tiny_shapes / "train-000000.tar")):
        out = tmp_path / ("out_" + str(len(images)))
        assert main_analyze(["--ckpt", str(ckpt), "--images", images, "--out", str(out), "--num-images", "5"]) == 0
        data = json.loads((out / "analysis.json").read_text())
        assert data["num_images"] == 5 and len(data["image_names"]) == 5
        assert data["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}  # the one it was trained with
    captured = capsys.readouterr()
    assert "topology score" in captured.out and "no mean/std" not in captured.err

    deit = DistillationClassifier(ViTConfig(**{**CFG, "num_distill_tokens": 1}), distillation="none")
    ckpt = task_checkpoint(tmp_path / "deit.ckpt", deit)
    out = tmp_path / "deit"
    assert main_analyze(["--ckpt", str(ckpt), "--images", str(tiny_shapes), "--out", str(out), "--num-images", "2",
                         "--rollout-token", "1"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert data["num_prefix_tokens"] == 2 and data["rollout_token"] == 1


def test_errors_say_what_to_do(tmp_path, capsys):
    from vit_experiments.models.resnet import ResNet, ResNetConfig
    from vit_experiments.tasks.classification import ImageClassifier

    args = ["--images", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main_analyze(["--ckpt", str(tmp_path / "nope.ckpt"), *args]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    vit = VisionTransformer(ViTConfig(**CFG))
    torch.save(vit.state_dict(), tmp_path / "bare.pth")  # bare ViT weights: the heads of a 16-wide model are a guess
    assert main_analyze(["--ckpt", str(tmp_path / "bare.pth"), *args]) == 2
    assert "cannot infer the number of attention heads" in capsys.readouterr().err
    torch.save(ResNet(ResNetConfig(depth=18, base_width=4)).state_dict(), tmp_path / "bare_resnet.pth")
    assert main_analyze(["--ckpt", str(tmp_path / "bare_resnet.pth"), *args]) == 2
    assert "architecture vitx cannot tell" in capsys.readouterr().err
    resnet = ImageClassifier(resnet=ResNetConfig(depth=18, base_width=4, num_classes=3))
    assert main_analyze(["--ckpt", str(task_checkpoint(tmp_path / "r.ckpt", resnet)), *args]) == 2
    assert "need a vision transformer" in capsys.readouterr().err
    ckpt = task_checkpoint(tmp_path / "b.ckpt", ImageClassifier(ViTConfig(**CFG)))
    (tmp_path / "empty").mkdir()
    assert main_analyze(["--ckpt", str(ckpt), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no images" in capsys.readouterr().err
