"""The switches of the GPU training step that `make gpu-check` measures, checked for what they do on a CPU:
AdamW's fused kernel chosen by device, whole-network compilation through the entry points a task's step calls,
and the thread policy that `vitx` sets before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vit_experiments.models.vit import ViTConfig, VisionTransformer
from vit_experiments.scaling import CompileBlocks, compile_network
from vit_experiments.tasks.optim import OptimConfig, adamw_implementation, build_optimizer
from vit_experiments.threads import configure

REPO = Path(__file__).resolve().parents[2]


def tiny_vit(**kw) -> VisionTransformer:
    return VisionTransformer(ViTConfig(variant=None, image_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       mlp_dim=64, num_classes=4, **kw))


def test_fused_adamw_only_where_asked_or_on_cuda():
    model = tiny_vit()
    assert adamw_implementation(model, None) == {}  # a CPU model: torch's default implementation
    assert adamw_implementation(model, False) == {"fused": False}
    opt, _ = build_optimizer(model, OptimConfig(fused=True), total_steps=10)
    assert opt.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_compile_network_keeps_outputs_and_names():
    torch.manual_seed(0)
    model = tiny_vit(num_distill_tokens=1).eval()
    x = torch.randn(2, 3, 16, 16)
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        expected = model(x)
        features = model.forward_features(x)
    assert compile_network(model, ("forward", "forward_features"), backend="eager") == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.forward_features(x), features)
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints are unchanged


def test_compile_scope_is_checked():
    assert CompileBlocks(scope="model").scope == "model"
    with pytest.raises(ValueError, match="scope"):
        CompileBlocks(scope="everything")


def test_thread_policy_respects_the_user():
    assert configure({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert configure(env) == {} and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {"VITX_THREADS": "off"}
    assert configure(env) == {} and "OMP_WAIT_POLICY" not in env


def test_the_vitx_command_sets_it_before_torch_loads():
    code = ("import os, sys; import vit_experiments.cli; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "VITX_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["PASSIVE", "True"], out.stderr[-2000:]
