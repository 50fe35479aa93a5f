"""The one checkpoint reader: for every family it says what the file is, rebuilds the network with the same
outputs, adapts weights for fine-tuning, and refuses files that are not safe or not checkpoints."""

from __future__ import annotations

import pickle

import pytest
import torch

from vit_experiments.checkpoints import load_weights, read_checkpoint
from vit_experiments.models.clip import CLIPConfig
from vit_experiments.models.resnet import ResNet, ResNetConfig
from vit_experiments.models.text import TextConfig
from vit_experiments.models.vit import ViTConfig, VisionTransformer
from vit_experiments.tasks.classification import ImageClassifier
from vit_experiments.tasks.contrastive import ContrastivePretraining
from vit_experiments.tasks.distillation import DistillationClassifier
from vit_experiments.tasks.optim import param_groups

VIT = dict(variant=None, image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def save(task, path, class_names=None):
    task.class_names = class_names
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 1, "global_step": 7}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


TASKS = {
    "vit": lambda: ImageClassifier(ViTConfig(**VIT), mean=MEAN, std=STD),
    "resnet": lambda: ImageClassifier(resnet=ResNetConfig(depth=18, base_width=4, num_classes=3, image_size=16),
                                      mean=MEAN, std=STD),
    "deit": lambda: DistillationClassifier(ViTConfig(**VIT, num_distill_tokens=1), distillation="none",
                                           mean=MEAN, std=STD),
    "clip": lambda: ContrastivePretraining(
        CLIPConfig(embed_dim=8, vision=ViTConfig(**{**VIT, "num_classes": 0}),
                   text=TextConfig(vocab_size=50, context_length=8, width=16, depth=1, num_heads=2)),
        mean=MEAN, std=STD),
}


@pytest.mark.parametrize("name", TASKS)
def test_every_family_reads_back_with_its_normalisation_and_outputs(name, tmp_path):
    torch.manual_seed(0)
    task = TASKS[name]().eval()
    info = read_checkpoint(str(save(task, tmp_path / "x.ckpt", class_names=["a", "b", "c"])))
    assert info.source == "vitx" and info.family == {"deit": "vit"}.get(name, name)
    assert info.normalization == {"mean": list(MEAN), "std": list(STD)} and info.class_names == ["a", "b", "c"]
    assert (info.epoch, info.global_step) == (1, 7) and info.task.endswith(type(task).__name__)
    model = info.build()
    x = torch.randn(2, 3, 16, 16)
    if name == "clip":
        ids = torch.tensor([[1, 5, 2, 0], [1, 7, 9, 2]])
        for a, b in zip(model(x, ids), task.model(x, ids)):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(info.vision_transformer()(x), task.model.visual(x))
    else:
        torch.testing.assert_close(model(x), task.model(x))


def test_fine_tuning_resamples_the_position_embedding_and_replaces_another_label_set(tmp_path):
    torch.manual_seed(0)
    path = save(TASKS["vit"](), tmp_path / "pre.ckpt")
    target = VisionTransformer(ViTConfig(**{**VIT, "image_size": 24, "num_classes": 5}))
    notes = load_weights(target, str(path))
    assert any("pos_embed resampled 4x4 -> 6x6" in n for n in notes)
    assert any("head.weight" in n for n in notes) and torch.count_nonzero(target.head.weight) == 0
    source = read_checkpoint(str(path)).state_dict
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(VisionTransformer(ViTConfig(**{**VIT, "depth": 3})), str(path))


def test_bare_state_dicts_are_recognised_but_have_no_architecture(tmp_path):
    torch.save(ResNet(ResNetConfig(depth=18, base_width=4)).state_dict(), tmp_path / "r.pth")
    info = read_checkpoint(str(tmp_path / "r.pth"))
    assert (info.source, info.family, info.config) == ("state_dict", "resnet", None)
    with pytest.raises(ValueError, match="without an architecture"):
        info.build()


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_unsafe_and_foreign_files_are_refused_with_what_to_do(tmp_path, capsys):
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "x": _Payload()}, f)
    with pytest.raises(ValueError, match="trust-checkpoint"):
        read_checkpoint(str(tmp_path / "evil.ckpt"))
    assert "this ran" not in capsys.readouterr().out
    torch.save({"lr": 0.1}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint vitx can read"):
        read_checkpoint(str(tmp_path / "other.ckpt"))
    with pytest.raises(FileNotFoundError):
        read_checkpoint(str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize("name", ["resnet", "clip"])
def test_layer_decay_numbers_the_layers_of_every_backbone(name):
    model = TASKS[name]().model
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    if name == "resnet":
        assert scales[id(params["fc.weight"])] == 1.0 and scales[id(params["conv1.weight"])] == 0.5 ** 5
        assert scales[id(params["layer2.0.conv1.weight"])] == 0.5 ** 3
    else:
        assert scales[id(params["logit_scale"])] == 1.0
        assert scales[id(params["visual.patch_embed.proj.weight"])] == scales[id(params["text.token_embedding.weight"])]


def test_batch_augmentation_resumes_with_the_checkpoint(tmp_path):
    """The draws of batch augmentation are keyed by the training-batch count the checkpoint holds, so a restored
    task flips (and mixes, erases, ...) its next batch as the uninterrupted one does, whatever the global RNG."""
    from types import SimpleNamespace

    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    labels = torch.zeros(16, dtype=torch.long)

    def next_batch(task):
        task._trainer = SimpleNamespace(training=True, global_rank=0)
        return task.on_after_batch_transfer((images, labels), 0)[0]

    first = TASKS["vit"]()
    for _ in range(3):
        next_batch(first)
    ckpt = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(ckpt)
    expected = next_batch(first)
    restored = TASKS["vit"]()
    restored.on_load_checkpoint(ckpt)
    torch.manual_seed(123)  # another global stream: no effect
    torch.testing.assert_close(next_batch(restored), expected)
    assert not torch.equal(next_batch(restored), expected)  # the next batch gets new draws
