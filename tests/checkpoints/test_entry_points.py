"""Imported weights at every entry point: `vitx analyze --ckpt`, fine-tuning (`init_from`), the DeiT teacher
(`teacher_ckpt`); and `vitx export` in the timm and Hugging Face layouts, read back with equal outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.checkpoints.hf_models import hf_model, images, transformers
from vit_experiments.analyze import main_analyze
from vit_experiments.checkpoints import read_checkpoint
from vit_experiments.checkpoints.hf_vit import convert_hf_state_dict
from vit_experiments.cli import main
from vit_experiments.models.vit import ViTConfig
from vit_experiments.tasks.classification import ImageClassifier
from vit_experiments.tasks.distillation import DistillationClassifier

TOL = dict(atol=1e-5, rtol=1e-5)
VIT = dict(variant=None, image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_dim=96)


def test_analyze_reads_a_timm_file_with_registers(tmp_path, capsys):
    ref = hf_model("deit")  # a class token and a second prefix token no head reads: a register, in timm's layout
    sd = convert_hf_state_dict(ref.state_dict())
    sd["reg_token"] = sd.pop("dist_token")
    save_file(sd, str(tmp_path / "vit_reg1.safetensors"))
    pics = tmp_path / "photos"
    pics.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(pics / f"{i}.png")
    rc = main_analyze(["--ckpt", str(tmp_path / "vit_reg1.safetensors"), "--images", str(pics), "--out",
                       str(tmp_path / "out"), "--num-heads", "4", "--num-images", "2", "--device", "cpu"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert (report["num_heads"], report["num_prefix_tokens"], report["layout"]) == (4, 2, "timm")
    assert "ImageNet's" in capsys.readouterr().err  # the file names no normalisation
    assert main_analyze(["--ckpt", str(tmp_path / "photos" / "0.png"), "--images", str(pics), "--out",
                         str(tmp_path / "out2")]) == 2
    assert "is not a checkpoint vitx can read: neither a PyTorch file" in capsys.readouterr().err


def test_fine_tuning_from_a_hugging_face_folder_resamples_and_replaces_the_head(tmp_path):
    ref = hf_model("vit")
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                          "image_std": [0.5] * 3}))
    task = ImageClassifier(ViTConfig(**{**VIT, "image_size": 48, "num_classes": 3}), init_from=str(tmp_path / "hf"))
    assert any("mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]: give the same (--model.mean" in n for n in task.init_notes)
    assert any("pos_embed resampled 4x4 -> 6x6" in n for n in task.init_notes)
    assert any("head.weight" in n for n in task.init_notes) and torch.count_nonzero(task.model.head.weight) == 0
    torch.testing.assert_close(task.model.blocks[1].mlp.fc2.weight, ref.vit.layers[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="do not fit"):
        ImageClassifier(ViTConfig(**{**VIT, "depth": 3, "num_classes": 3}), init_from=str(tmp_path / "hf"))


def test_fine_tuning_notes_heads_that_differ_from_the_checkpoint(tmp_path):
    torch.save(convert_hf_state_dict(hf_model("vit").state_dict()), tmp_path / "vit.pth")
    task = ImageClassifier(ViTConfig(**{**VIT, "num_classes": 5}), init_from=str(tmp_path / "vit.pth"))
    assert any("num_heads: the checkpoint's is 1, this model's 4" in n for n in task.init_notes)
    task = ImageClassifier(ViTConfig(**{**VIT, "num_classes": 5}), init_from=str(tmp_path / "vit.pth#num_heads=4"))
    assert not any("num_heads" in n for n in task.init_notes)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(task.model(x), hf_model("vit")(pixel_values=x).logits, **TOL)


def test_a_hugging_face_deit_is_a_teacher(tmp_path):
    ref = hf_model("deit-teacher")
    ref.save_pretrained(tmp_path / "teacher")
    student = DistillationClassifier(ViTConfig(**{**VIT, "num_classes": 5, "num_distill_tokens": 1}),
                                     distillation="hard", teacher_ckpt=str(tmp_path / "teacher"))
    teacher = student.teacher
    assert teacher.num_classes == 5 and not any(p.requires_grad for p in teacher.parameters())
    teacher.set_input_normalization(teacher.mean, teacher.std)  # images already in the teacher's normalisation
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), ref(pixel_values=x).logits, **TOL)


def _vitx_checkpoint(path, **vit):
    torch.manual_seed(0)
    task = ImageClassifier(ViTConfig(**{**VIT, "num_classes": 3, **vit}), mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # no zero or constant parameter left (heads, biases, norms)
    task.class_names = ["a", "b", "c"]
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return task.model.eval()


@pytest.mark.parametrize("deit", [False, True])
def test_export_hf_loads_in_transformers_with_equal_outputs(deit, tmp_path):
    model = _vitx_checkpoint(tmp_path / "last.ckpt", num_distill_tokens=int(deit))
    with pytest.raises(SystemExit) as done:
        main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert done.value.code == 0
    cls = transformers.DeiTForImageClassificationWithTeacher if deit else transformers.ViTForImageClassification
    hf = cls.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), **TOL)
    back = read_checkpoint(str(tmp_path / "hf"))
    assert back.normalization == {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2]}
    assert back.class_names == ["a", "b", "c"]


@pytest.mark.parametrize("out", ["vit.safetensors", "vit.pth", "folder"])
def test_export_timm_reads_back_with_equal_outputs(out, tmp_path):
    model = _vitx_checkpoint(tmp_path / "last.ckpt", num_reg_tokens=2, pool="avg", fc_norm=True, pre_norm=True)
    with pytest.raises(SystemExit) as done:
        main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--format", "timm", "--out", str(tmp_path / out)])
    assert done.value.code == 0
    sd = torch.load(tmp_path / out, weights_only=True) if out.endswith(".pth") else None
    if sd is not None:  # timm's names and shapes
        assert sd["reg_token"].shape == (1, 2, 64) and sd["pos_embed"].shape == (1, 3 + 16, 64)
        assert "fc_norm.weight" in sd and "norm.weight" not in sd and "norm_pre.weight" in sd
    heads = None if out == "folder" else 4  # a folder's config.json names them; a bare file needs them given
    back = read_checkpoint(str(tmp_path / out), num_heads=heads)
    assert back.source == "timm" and back.config == model.cfg
    if out == "folder":
        assert back.normalization == {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2]}
        assert back.class_names == ["a", "b", "c"]
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(back.build()(x), model(x), **TOL)


def test_export_refuses_what_the_hugging_face_vit_cannot_hold(tmp_path, capsys):
    _vitx_checkpoint(tmp_path / "last.ckpt", num_reg_tokens=1)
    with pytest.raises(SystemExit) as done:
        main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert done.value.code == 2 and "register tokens: export this model with --format timm" in capsys.readouterr().err


def test_fine_tuning_a_register_model_at_another_resolution_keeps_its_prefix_tokens(tmp_path):
    sd = convert_hf_state_dict(hf_model("deit").state_dict())
    sd["reg_token"] = sd.pop("dist_token")  # [cls, register, 4x4 patches]
    torch.save(sd, tmp_path / "reg.pth")
    task = ImageClassifier(ViTConfig(**{**VIT, "image_size": 48, "num_classes": 5, "num_reg_tokens": 1}),
                           init_from=str(tmp_path / "reg.pth#num_heads=4"))
    assert any("pos_embed resampled 4x4 -> 6x6" in n for n in task.init_notes)
    torch.testing.assert_close(task.model.pos_embed[:, :2], sd["pos_embed"][:, :2])  # prefix entries kept as they are
    torch.testing.assert_close(task.model.reg_token, sd["reg_token"])
    with pytest.raises(ValueError, match="do the prefix tokens match"):  # a model without the register
        ImageClassifier(ViTConfig(**{**VIT, "num_classes": 5}), init_from=str(tmp_path / "reg.pth#num_heads=4"))
