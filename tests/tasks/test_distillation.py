"""DeiT distillation: the frozen teacher, fused inference, the EMA and layer-decay arithmetic, and `vitx fit`
for a few steps with each loss (a tiny ResNet teacher trained first by `vitx fit` with the CNN task)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from data_pipelines.transforms import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, normalize
from tests.conftest import REPO, scalar_tags
from vit_experiments.cli import main
from vit_experiments.models.resnet import ResNetConfig
from vit_experiments.models.vit import ViTConfig
from vit_experiments.tasks.classification import ImageClassifier
from vit_experiments.tasks.distillation import DeiTAugment, DistillationClassifier
from vit_experiments.tasks.ema import build_ema, ema_decay_at
from vit_experiments.tasks.optim import param_groups
from vit_experiments.tasks.teacher import load_teacher

TEACHER_CONFIG = str(REPO / "conf" / "cnn" / "teacher-shapes.yaml")
DISTILL_CONFIG = str(REPO / "conf" / "deit" / "distill-shapes.yaml")
NO_AUGMENT = DeiTAugment(rand_augment_ops=0, mixup_alpha=0, cutmix_alpha=0, erase_prob=0, repeats=1)


def student_config(**overrides) -> ViTConfig:
    kw = dict(variant=None, image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
              num_classes=10, num_distill_tokens=1)
    kw.update(overrides)
    return ViTConfig(**kw)


def save_checkpoint(task: L.LightningModule, path: Path) -> Path:
    """What Lightning's checkpoint holds for a teacher: the hyperparameters, the state dict and what the task adds
    in on_save_checkpoint (its network, normalisation and class names)."""
    ckpt = {"hyper_parameters": dict(task.hparams), "state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ResNetConfig(depth=18, num_classes=10, image_size=24, stem="cifar", base_width=4)
    task = ImageClassifier(resnet=cfg, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    for p in task.model.parameters():  # not an identity-like teacher: every weight nonzero
        torch.nn.init.normal_(p, std=0.1)
    return save_checkpoint(task, tmp_path_factory.mktemp("teacher") / "cnn.ckpt")


def distiller(cnn_ckpt: Path, **overrides) -> DistillationClassifier:
    kw = dict(vit=student_config(), distillation="hard", teacher_ckpt=str(cnn_ckpt), augment=NO_AUGMENT,
              mean=IMAGENET_MEAN, std=IMAGENET_STD)
    kw.update(overrides)
    return DistillationClassifier(**kw)


# ---- the teacher -------------------------------------------------------------------------------------------------


def test_teacher_sees_its_own_normalisation_and_resolution(cnn_ckpt):
    teacher = load_teacher(cnn_ckpt, IMAGENET_MEAN, IMAGENET_STD)
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    student_view = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(teacher.adapt(student_view), normalize(images, CIFAR10_MEAN, CIFAR10_STD))
    assert teacher.adapt(torch.zeros(2, 3, 16, 16)).shape == (2, 3, 24, 24)  # fed at its own 24 px
    direct = teacher.model(normalize(images, CIFAR10_MEAN, CIFAR10_STD))
    torch.testing.assert_close(teacher(student_view), direct)


def test_teacher_gets_no_gradient_and_stays_in_eval(cnn_ckpt):
    torch.manual_seed(0)
    task = distiller(cnn_ckpt)
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    task.train()  # what Lightning does at every epoch start and after validation
    assert task.model.training and not task.teacher.training
    assert not any(m.training for m in task.teacher.modules())
    images = normalize(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8))
    labels = torch.randint(0, 10, (4,))
    with torch.no_grad():
        expected = task.teacher(images)
    task.log = lambda *a, **k: None  # no trainer attached
    loss = task.training_step((images, labels, labels), 0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert any(p.grad is not None for p in task.model.parameters())
    for k, v in task.teacher.state_dict().items():  # BatchNorm statistics untouched: eval mode
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(task.teacher(images), expected)


def test_loading_a_teacher_leaves_the_random_stream_alone(cnn_ckpt):
    """So that runs with and without a teacher draw the same student init and augmentations from one seed."""
    torch.manual_seed(0)
    load_teacher(cnn_ckpt)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_teacher_runs_in_the_run_precision(cnn_ckpt):
    teacher = load_teacher(cnn_ckpt, IMAGENET_MEAN, IMAGENET_STD)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what precision="bf16-mixed" wraps the steps in
        assert teacher(torch.randn(2, 3, 24, 24)).dtype == torch.bfloat16


def test_a_vit_classifier_checkpoint_is_a_teacher_too(tmp_path):
    torch.manual_seed(0)
    vit_task = ImageClassifier(student_config(num_distill_tokens=0, image_size=8, patch_size=4))
    teacher = load_teacher(save_checkpoint(vit_task, tmp_path / "vit.ckpt"), IMAGENET_MEAN, IMAGENET_STD)
    x = torch.randn(3, 3, 16, 16)
    assert teacher(x).shape == (3, 10)
    torch.testing.assert_close(teacher(x), vit_task.model.eval()(teacher.adapt(x)))


def test_bad_teachers_are_clear_errors(cnn_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="make teacher"):
        distiller(tmp_path / "missing.ckpt")
    torch.save({"hyper_parameters": {"lr": 1.0}, "state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint vitx can read"):
        distiller(tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="teacher predicts 10 classes but the student 5"):
        distiller(cnn_ckpt, vit=student_config(num_classes=5))
    with pytest.raises(ValueError, match="needs teacher_ckpt"):
        DistillationClassifier(student_config(), distillation="soft")
    with pytest.raises(ValueError, match="num_distill_tokens: 1"):
        DistillationClassifier(student_config(num_distill_tokens=0), distillation="none")


def test_resnet_classifier_loads_a_resnet_state_dict_by_name(tmp_path):
    """A ResNet saved by other code in the common layout (here: a 1000-class one) starts a 10-class teacher."""
    from vit_experiments.models.resnet import build_resnet

    src = build_resnet(18, num_classes=1000, base_width=4)
    torch.save(src.state_dict(), tmp_path / "resnet18.pth")
    task = ImageClassifier(resnet=ResNetConfig(depth=18, num_classes=10, base_width=4),
                           init_from=str(tmp_path / "resnet18.pth"))
    assert torch.equal(task.model.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    assert torch.equal(task.model.layer2[0].downsample[1].running_var, src.layer2[0].downsample[1].running_var)
    assert task.model.fc.out_features == 10 and torch.count_nonzero(task.model.fc.weight) == 0
    torch.save(build_resnet(34, base_width=4).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="unexpected"):
        ImageClassifier(resnet=ResNetConfig(depth=18, base_width=4), init_from=str(tmp_path / "resnet34.pth"))


# ---- the student ---------------------------------------------------------------------------------------------


def test_fused_inference_is_the_average_of_the_heads(cnn_ckpt):
    torch.manual_seed(0)
    task = distiller(cnn_ckpt).eval()
    x = torch.randn(3, 3, 16, 16)
    cls_logits, dist_logits = task.model.forward_distill_heads(task.model.forward_features(x))
    assert not torch.allclose(cls_logits, dist_logits)
    torch.testing.assert_close(task(x), (cls_logits + dist_logits) / 2)
    torch.testing.assert_close(task.predict_step((x,), 0)["probs"], ((cls_logits + dist_logits) / 2).softmax(-1))


def test_checkpoint_leaves_out_the_teacher_and_loads_back(cnn_ckpt):
    task = distiller(cnn_ckpt, ema_decay=0.9)
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    fresh = distiller(cnn_ckpt, ema_decay=0.9)
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    torch.testing.assert_close(fresh.model.head.weight, task.model.head.weight)


def test_analyses_skip_both_prefix_tokens(cnn_ckpt):
    from vit_experiments.analysis.report import analyze_model, vit_geometry

    backbone = distiller(cnn_ckpt).analysis_backbone()
    assert vit_geometry(backbone) == ((4, 4), 4, 2)  # grid, patch, prefix tokens: class + distillation
    analyze_model(backbone, torch.randn(2, 3, 16, 16), rollout_token=1, figures=False)


# ---- EMA and layer-wise learning-rate decay --------------------------------------------------------------------


def test_ema_update_arithmetic():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = build_ema(model, decay=0.9)
    values = [1.0, 2.0, 4.0]
    expected = None
    for v in values:
        model.weight.data.fill_(v)
        ema.update_parameters(model)
        expected = v if expected is None else 0.9 * expected + 0.1 * v  # the first update copies
        assert ema.module.weight.item() == pytest.approx(expected)
    assert expected == pytest.approx(0.9 * (0.9 * 1 + 0.1 * 2) + 0.1 * 4)
    assert not any(p.requires_grad for p in ema.parameters())


def test_ema_warmup_ramps_the_decay():
    assert ema_decay_at(0.999, 1, warmup=True) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 10**6, warmup=True) == 0.999
    assert ema_decay_at(0.999, 1, warmup=False) == 0.999
    model = torch.nn.Linear(1, 1, bias=False)
    ema = build_ema(model, decay=0.99, warmup=True)
    model.weight.data.fill_(0.0)
    ema.update_parameters(model)  # copy: 0
    model.weight.data.fill_(11.0)
    ema.update_parameters(model)  # n = 1: decay 2/11 -> 2/11 * 0 + 9/11 * 11 = 9
    assert ema.module.weight.item() == pytest.approx(9.0)


def test_layer_decay_scales_lr_by_depth():
    from vit_experiments.models.vit import VisionTransformer

    model = VisionTransformer(student_config(depth=3))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert lr_of[id(model.head.weight)] == lr_of[id(model.head_dist.weight)] == 1.0
    assert lr_of[id(model.blocks[2].attn.qkv.weight)] == 0.5
    assert lr_of[id(model.blocks[0].mlp.fc1.weight)] == 0.125
    assert lr_of[id(model.patch_embed.proj.weight)] == lr_of[id(model.dist_token)] == 0.0625
    assert decay_of[id(model.pos_embed)] == 0.0 and decay_of[id(model.blocks[1].norm1.weight)] == 0.0
    assert decay_of[id(model.blocks[1].attn.proj.weight)] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ---- training-batch augmentation ----------------------------------------------------------------------------


def test_training_batch_gets_mixed_targets_and_keeps_its_size(cnn_ckpt):
    torch.manual_seed(0)
    task = distiller(cnn_ckpt, augment=DeiTAugment(repeats=2))

    class Training:  # the trainer attributes the hook reads
        training = True
        global_rank = 0

    task.trainer = Training()
    task._trainer = task.trainer
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(8)
    out, seen, targets = task.on_after_batch_transfer((images, labels), 0)
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert seen.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # repeated augmentation: copies in a row
    assert targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))


# ---- `vitx fit` end to end -----------------------------------------------------------------------------------


def common_args(shapes: Path, runs: Path) -> list[str]:
    return [
        "--data.train_shards", str(shapes / "train-{000000..000003}.tar"),
        "--data.val_shards", str(shapes / "val-000000.tar"),
        "--data.synthesize_if_missing", "false",
        "--data.batch_size", "16",
        "--data.num_workers", "0",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks.window_size", "2",  # the last callback: ImageThroughput
    ]


@pytest.fixture(scope="module")
def fitted_teacher(tiny_shapes, tmp_path_factory) -> Path:
    """`vitx fit` with the shipped teacher config, shrunk: a width-4 ResNet-18 on 16-px shapes, 2 steps."""
    runs = tmp_path_factory.mktemp("runs")
    main(["fit", "--config", TEACHER_CONFIG, *common_args(tiny_shapes, runs),
          "--model.resnet.image_size", "16", "--model.resnet.base_width", "4",
          "--data.normalization", "cifar10"])  # not the students' default: the teacher must keep its own
    (ckpt,) = (runs / "cnn-teacher-shapes").glob("*/checkpoints/last.ckpt")
    return ckpt


def test_a_fitted_teacher_keeps_the_normalisation_its_data_module_gave_it(fitted_teacher):
    teacher = load_teacher(fitted_teacher, IMAGENET_MEAN, IMAGENET_STD)
    assert teacher.mean == pytest.approx(CIFAR10_MEAN) and teacher.std == pytest.approx(CIFAR10_STD)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(teacher.adapt(normalize(images, IMAGENET_MEAN, IMAGENET_STD)),
                               normalize(images, CIFAR10_MEAN, CIFAR10_STD))


@pytest.mark.parametrize("kind", ["hard", "soft", "none"])
def test_vitx_fit_with_each_loss(kind, fitted_teacher, tiny_shapes, tmp_path):
    main(["fit", "--config", DISTILL_CONFIG, *common_args(tiny_shapes, tmp_path),
          "--model.distillation", kind, "--model.teacher_ckpt", str(fitted_teacher),
          "--model.vit.image_size", "16", "--model.vit.embed_dim", "32", "--model.vit.depth", "1",
          "--model.vit.num_heads", "2", "--model.vit.mlp_dim", "64"])
    (run_dir,) = (tmp_path / "deit-distill-shapes").iterdir()
    tags = scalar_tags(run_dir)
    expected = {"train/loss", "train/acc1", "train/acc1_cls", "train/acc1_dist", "val/loss", "val/acc1",
                "val/acc1_cls", "val/acc1_dist", "val/acc5", "val/ema_acc1"}
    if kind != "none":
        expected |= {"train/agreement", "val/agreement", "val/teacher_acc1"}
    assert expected <= tags, f"missing {sorted(expected - tags)}"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["distillation"] == kind and ckpt["global_step"] == 2
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])


def test_a_student_checkpoint_whose_teacher_moved_validates_but_does_not_resume(fitted_teacher, tiny_shapes,
                                                                               tmp_path, capsys):
    """The teacher's weights are not in the student's checkpoints: `vitx validate` does without them (one warning
    line, no teacher metrics); resuming the fit stops with what to set, and `--model.teacher_ckpt` then wins over
    the checkpoint's path."""
    import shutil

    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(fitted_teacher, teacher)
    student = ["--config", DISTILL_CONFIG, "--model.distillation", "hard", "--model.vit.image_size", "16",
               "--model.vit.embed_dim", "32", "--model.vit.depth", "1", "--model.vit.num_heads", "2",
               "--model.vit.mlp_dim", "64"]
    main(["fit", *student, *common_args(tiny_shapes, tmp_path / "fit"), "--model.teacher_ckpt", str(teacher)])
    (ckpt,) = (tmp_path / "fit").rglob("last.ckpt")
    teacher.unlink()
    capsys.readouterr()

    main(["validate", *student, *common_args(tiny_shapes, tmp_path / "val"), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    (warning,) = [line for line in err.splitlines() if str(teacher) in line]
    assert "without its teacher" in warning and "--model.teacher_ckpt" in warning
    tags = scalar_tags(next((tmp_path / "val" / "deit-distill-shapes").iterdir()))
    assert "val/acc1" in tags and not {"val/teacher_acc1", "val/agreement"} & tags

    resume = ["fit", *student, *common_args(tiny_shapes, tmp_path / "resume"), "--trainer.max_epochs", "2",
              "--ckpt_path", str(ckpt)]
    with pytest.raises(FileNotFoundError, match=f"{teacher}.*--model.teacher_ckpt"):
        main(resume)
    main([*resume, "--model.teacher_ckpt", str(fitted_teacher)])
    (resumed,) = (tmp_path / "resume").rglob("last.ckpt")
    state = torch.load(resumed, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and state["hyper_parameters"]["teacher_ckpt"] == str(fitted_teacher)
