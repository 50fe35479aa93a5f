"""The scaling overlays for real: `vitx fit` under DDP and FSDP2 (conf/trainer/ddp.yaml, fsdp.yaml) on 2 CPU
processes (gloo) reaches the losses of one process with the same global batch, for ViT and CLIP; an FSDP
checkpoint validates on one process and resumes on two (with activation checkpointing and torch.compile stacked
on) with the losses and learning rates of the uninterrupted run; activation checkpointing and torch.compile per
block change neither outputs nor gradients nor parameter names.

The 2-process runs share one torchrun launch (tests.distributed._scaling) to pay the start-up once.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.conftest import REPO
from tests.models.test_clip import captions, tiny_config
from vit_experiments.losses import contrastive_loss
from vit_experiments.models.clip import CLIP
from vit_experiments.models.resnet import ResNet, ResNetConfig
from vit_experiments.models.vit import ViTConfig, VisionTransformer
from vit_experiments.scaling import compile_units, scaling_units

TRAINER = REPO / "conf" / "trainer"
STEPS = 4  # 2 epochs of 2 global batches of 16
LOSS_TOL = dict(rtol=0, atol=2e-4)  # reduction order differs between 1 and 2 processes; AdamW amplifies it a little
needs_distributed = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# -- activation checkpointing and compile, in one process -------------------------------------------------------


def tiny_vit(**overrides) -> VisionTransformer:
    cfg = dict(variant=None, image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return VisionTransformer(ViTConfig(**{**cfg, **overrides}))


def grads_after_step(model: torch.nn.Module, loss_fn, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same dropout and stochastic-depth draws for both models
    loss_fn(model).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def vit_loss(model):
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return model(x).logsumexp(-1).mean()


def clip_loss(model):
    img, txt, scale = model(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), captions(4))
    return contrastive_loss(img, txt, scale, gather=False)


@pytest.mark.parametrize(
    "make, loss_fn",
    [
        (lambda: tiny_vit(drop_rate=0.1, drop_path_rate=0.2), vit_loss),  # random masks are recomputed alike
        (lambda: CLIP(tiny_config()), clip_loss),  # both towers; the text blocks take is_causal
        (lambda: ResNet(ResNetConfig(depth=18, base_width=4, num_classes=5, stem="cifar", image_size=16)),
         vit_loss),  # per residual stage, BatchNorm statistics counted once
    ],
    ids=["vit-with-dropout-and-drop-path", "clip", "resnet"],
)
def test_activation_checkpointing_gives_the_same_gradients(make, loss_fn):
    torch.manual_seed(0)
    plain = make().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert len(scaling_units(ckpt)) > 0
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # names unchanged: checkpoints interchange
    expected, got = grads_after_step(plain, loss_fn), grads_after_step(ckpt, loss_fn)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):  # BatchNorm running statistics
        torch.testing.assert_close(b, a, msg=lambda m, name=name: f"{name}: {m}")


def test_activation_checkpointing_recomputes_in_backward_and_switches_off():
    model = tiny_vit()
    model.set_grad_checkpointing(True)
    calls = []
    model.blocks[0].mlp.register_forward_pre_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    vit_loss(model).backward()
    assert len(calls) == 2  # the forward, and its recomputation during the backward
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))  # no recomputation to prepare when there is no backward
    assert len(calls) == 3
    model.set_grad_checkpointing(False)
    vit_loss(model).backward()
    assert len(calls) == 4  # no recomputation


def test_compile_blocks_keeps_names_and_outputs():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    compiled = copy.deepcopy(model)
    compiled.set_grad_checkpointing(True)  # the two compose: compile traces the checkpointed forward
    assert compile_units(compiled, backend="eager") == 2  # "eager": trace with dynamo, no code generation
    assert list(compiled.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(compiled(x), model(x))


# -- 2 processes ---------------------------------------------------------------------------------------------


def experiment(tmp: Path, name: str, clip: bool = False, ckpt_dir: bool = False, compile: bool = False,
               resnet: bool = False) -> Path:
    """A tiny experiment on GlobalBatchData that records its losses in tmp/<name>.json."""
    callbacks = [{"class_path": "tests.distributed._scaling.RecordLosses", "init_args": {"path": str(tmp / f"{name}.json")}}]
    if compile:  # as conf/trainer/compile.yaml, but traced without generating code, which takes long on a CPU
        callbacks.append({"class_path": "vit_experiments.scaling.CompileBlocks", "init_args": {"backend": "aot_eager"}})
    if ckpt_dir:
        callbacks.append({
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp / name), "filename": "{epoch}-{step}", "save_top_k": -1,
                          "every_n_epochs": 1, "save_on_train_epoch_end": True},
        })
    if clip:
        model = {
            "class_path": "vit_experiments.tasks.contrastive.ContrastivePretraining",
            "init_args": {
                "clip": {
                    "embed_dim": 16,
                    "vision": {"variant": None, "image_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1,
                               "num_heads": 2, "num_classes": 0, "pre_norm": True, "patch_bias": False},
                    "text": {"vocab_size": 50, "context_length": 12, "width": 32, "depth": 2, "num_heads": 2},
                },
                "optim": {"lr": 1e-3, "warmup_steps": 2},
            },
        }
    elif resnet:  # the DeiT teacher's network: BatchNorm under sharding and mixed precision
        model = {
            "class_path": "vit_experiments.tasks.classification.ImageClassifier",
            "init_args": {
                "resnet": {"depth": 18, "base_width": 4, "num_classes": 4, "stem": "cifar", "image_size": 16},
                "optim": {"lr": 1e-3, "warmup_steps": 2},
                "hflip": False,
            },
        }
    else:
        model = {
            "class_path": "vit_experiments.tasks.classification.ImageClassifier",
            "init_args": {
                "vit": {"variant": None, "image_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2,
                        "num_heads": 2, "mlp_dim": 64, "num_classes": 4},
                "optim": {"lr": 1e-3, "warmup_steps": 2},
                "hflip": False,  # flips are random per process; the comparison needs the same images
            },
        }
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": False, "default_root_dir": str(tmp / "root"), "callbacks": callbacks,
        },
        "model": model,
        "data": {"class_path": "tests.distributed._scaling.GlobalBatchData",
                 "init_args": {"global_batch": 16, "batches": 2, "captions": clip}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit_args(config: Path, *overlays: str, extra: tuple = ()) -> list[str]:
    args = ["fit", "--config", str(config)]
    for overlay in overlays:
        args += ["--config", str(TRAINER / f"{overlay}.yaml")]
    return args + ["--trainer.accelerator", "cpu", "--trainer.devices", "2", *extra]


def losses(tmp: Path, name: str) -> list[float]:
    return json.loads((tmp / f"{name}.json").read_text())["loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Single-process references in this process; DDP, FSDP, resumed FSDP in 2 processes (one torchrun)."""
    from vit_experiments.cli import main

    tmp = tmp_path_factory.mktemp("scaling")
    torch.set_num_threads(1)
    main(["fit", "--config", str(experiment(tmp, "single", ckpt_dir=True))])
    main(["fit", "--config", str(experiment(tmp, "clip-single", clip=True))])
    jobs = [
        fit_args(experiment(tmp, "ddp"), "ddp"),
        fit_args(experiment(tmp, "fsdp", ckpt_dir=True), "fsdp"),
        # resumed after the first epoch, with activation checkpointing and compile on top: neither may change
        # the numbers, and both must compose with sharding
        fit_args(experiment(tmp, "fsdp-resumed", compile=True), "fsdp", "activation_checkpointing",
                 extra=("--ckpt_path", str(tmp / "fsdp" / "epoch=0-step=2.ckpt"))),
        fit_args(experiment(tmp, "clip-ddp", clip=True), "ddp"),
        fit_args(experiment(tmp, "clip-fsdp", clip=True), "fsdp"),
        # bf16 autocast with bf16 all-gathers and fp32 gradient reduction (the mixed-precision policy)
        fit_args(experiment(tmp, "fsdp-bf16"), "fsdp", "bf16"),
        fit_args(experiment(tmp, "resnet-fsdp-bf16", resnet=True), "fsdp", "bf16"),
    ]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.distributed._scaling", str(tmp / "jobs.json")]
    try:
        proc = subprocess.run(cmd, cwd=tmp, env=env, timeout=300, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process runs did not finish within 300 s (processes hanging at a collective?)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp


@needs_distributed
@pytest.mark.parametrize("family", ["vit", "clip"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reach_the_losses_of_one_with_the_same_global_batch(runs, strategy, family):
    prefix = "" if family == "vit" else "clip-"
    single, multi = losses(runs, f"{prefix}single"), losses(runs, f"{prefix}{strategy}")
    assert len(single) == len(multi) == STEPS
    assert single[0] != single[-1]  # it trains
    torch.testing.assert_close(torch.tensor(multi), torch.tensor(single), **LOSS_TOL)


@needs_distributed
def test_fsdp_under_bf16_stays_close_to_fp32(runs):
    single, bf16 = losses(runs, "single"), losses(runs, "fsdp-bf16")
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(single), rtol=0, atol=1e-2)
    assert bf16 != single  # it did run in bf16


@needs_distributed
def test_a_resnet_trains_under_fsdp_and_bf16(runs):
    """BatchNorm keeps fp32 parameters beside its fp32 statistics while the convolutions gather bf16 ones."""
    bf16 = losses(runs, "resnet-fsdp-bf16")
    assert len(bf16) == STEPS and all(map(math.isfinite, bf16)) and bf16[0] != bf16[-1]


@needs_distributed
def test_fsdp_checkpoint_resumes_on_two_processes_with_the_same_losses_and_schedule(runs):
    uninterrupted = json.loads((runs / "fsdp.json").read_text())
    resumed = json.loads((runs / "fsdp-resumed.json").read_text())
    assert resumed["step"] == uninterrupted["step"][2:] == [3, 4]  # the step count continues
    assert resumed["lr"] == pytest.approx(uninterrupted["lr"][2:])  # so does the learning-rate schedule
    torch.testing.assert_close(torch.tensor(resumed["loss"]), torch.tensor(uninterrupted["loss"][2:]),
                               rtol=0, atol=1e-6)


@needs_distributed
def test_fsdp_checkpoint_validates_on_one_process(runs):
    """The FSDP run's last checkpoint is one ordinary file: `vitx validate` on one process reads it, and its
    validation loss is the single-process run's (same weights, up to the FSDP-vs-single tolerance)."""
    from vit_experiments.cli import VitxCLI

    ckpt = torch.load(runs / "fsdp" / "epoch=1-step=4.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS and "model.blocks.0.attn.qkv.weight" in ckpt["state_dict"]
    val = {}
    for name in ("fsdp", "single"):
        cli = VitxCLI(args=["validate", "--config", str(runs / "single.yaml"), "--trainer.limit_val_batches", "2",
                            "--ckpt_path", str(runs / name / "epoch=1-step=4.ckpt")])
        val[name] = cli.trainer.callback_metrics["val/loss"]
    torch.testing.assert_close(val["fsdp"], val["single"], **LOSS_TOL)


# -- the overlays as configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay, callback", [("activation_checkpointing", "ActivationCheckpointing"),
                                               ("compile", "CompileBlocks")])
def test_callback_overlays_add_to_the_experiments_callbacks(overlay, callback, capsys):
    """`trainer.callbacks+` appends: the experiment keeps its checkpointing, logging and analysis callbacks."""
    from vit_experiments.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "conf" / "vit" / "pretrain.yaml"), "--config", str(TRAINER / f"{overlay}.yaml"),
              "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    classes = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert classes[-1] == callback
    assert "ModelCheckpoint" in classes, (
        f"stacking {overlay}.yaml replaced the experiment's callbacks {classes}: the config merge in "
        "vit_experiments/cli.py must extend a list given as `key+:` instead of replacing it"
    )


def test_overlays_say_how_to_run_them():
    for overlay in sorted(TRAINER.glob("*.yaml")):
        head = overlay.read_text().split("\ntrainer:")[0]
        assert "vitx fit" in head or "vitx" in head, f"{overlay.name} should start by saying the command that uses it"


def test_fsdp_refuses_fp16_with_a_clear_message():
    from types import SimpleNamespace

    from vit_experiments.tasks.classification import ImageClassifier

    task = ImageClassifier(ViTConfig(variant=None, image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                     num_classes=4))
    task._trainer = SimpleNamespace(precision="16-mixed")
    task._device_mesh = object()  # as ModelParallelStrategy sets it
    with pytest.raises(ValueError, match="bf16.yaml"):
        task.configure_model()
