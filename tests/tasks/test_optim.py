"""The learning-rate schedule and the weight-decay split, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vit_experiments.tasks.optim import OptimConfig, build_optimizer, param_groups, warmup_cosine


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    assert warmup_cosine(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(35, 10, 110, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_no_decay_on_norms_biases_and_named_tokens():
    class Net(nn.Sequential):
        def no_weight_decay(self):
            return {"pos_embed"}

    model = Net(nn.Linear(4, 4), nn.LayerNorm(4))
    model.register_parameter("pos_embed", nn.Parameter(torch.zeros(1, 3, 4)))
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_scheduler_steps_the_lr():
    model = nn.Linear(2, 2)
    opt, sched = build_optimizer(model, OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.0), total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] > lrs[5] > lrs[6] > lrs[7]


@pytest.mark.parametrize("bad", [dict(lr=0), dict(warmup_steps=-1), dict(min_lr_ratio=2)])
def test_bad_optim_config(bad):
    with pytest.raises(ValueError):
        OptimConfig(**bad)
