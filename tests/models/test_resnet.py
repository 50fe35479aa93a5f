"""ResNet: the common parameter layout (so outside checkpoints load by name), sizes, stems, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from vit_experiments.models.resnet import ResNet, ResNetConfig, build_resnet

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def reference_layout(blocks: tuple[int, ...], bottleneck: bool) -> set[str]:
    """The state-dict keys of the common (torchvision) ResNet, written out from that layout:
    conv1, bn1, layer{1..4}.{i}.conv{1,2[,3]}/bn{1,2[,3]}, downsample.0 (1x1 conv) + downsample.1 (BN) on the
    first block of a stage whose shape changes (layer1 too for bottlenecks, whose output is 4x wider), fc."""
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{b}" for b in BN}
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for stage, n in enumerate(blocks, start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            for c in convs:
                keys.add(f"{p}.conv{c}.weight")
                keys |= {f"{p}.bn{c}.{b}" for b in BN}
            if i == 0 and (stage > 1 or bottleneck):
                keys.add(f"{p}.downsample.0.weight")
                keys |= {f"{p}.downsample.1.{b}" for b in BN}
    return keys


# (blocks per stage, bottleneck, state-dict entries, parameters at 1000 classes): the reference counts
LAYOUTS = {
    18: ((2, 2, 2, 2), False, 122, 11_689_512),
    34: ((3, 4, 6, 3), False, 218, 21_797_672),
    50: ((3, 4, 6, 3), True, 320, 25_557_032),
}


@pytest.mark.parametrize("depth", list(LAYOUTS))
def test_state_dict_keys_and_sizes_match_the_common_layout(depth):
    blocks, bottleneck, n_keys, n_params = LAYOUTS[depth]
    with torch.device("meta"):  # shapes only, no memory
        model = build_resnet(depth)
    keys = set(model.state_dict())
    assert keys == reference_layout(blocks, bottleneck)
    assert len(keys) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_parameter_shapes_of_resnet50_match_the_layout():
    with torch.device("meta"):
        sd = build_resnet(50).state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: the 3x3 carries the stride
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd["fc.weight"].shape == (1000, 2048)


def test_state_dict_round_trips_into_a_fresh_model():
    torch.manual_seed(0)
    a = build_resnet(18, num_classes=5, base_width=8, stem="cifar", image_size=16).eval()
    b = build_resnet(18, num_classes=5, base_width=8, stem="cifar", image_size=16).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("stem, size, spatial", [("cifar", 32, 4), ("imagenet", 64, 2)])
def test_stems_and_output_shapes(stem, size, spatial):
    torch.manual_seed(0)
    model = build_resnet(18, num_classes=3, base_width=4, stem=stem, image_size=size)
    x = torch.randn(2, 3, size, size)
    features = model.forward_features(x)
    assert features.shape == (2, 32, spatial, spatial)  # 8 x base width, stride 8 (cifar) or 32
    assert model.forward_head(features, pre_logits=True).shape == (2, 32)
    assert model(x).shape == (2, 3)


def test_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = build_resnet(50, num_classes=4, base_width=4, stem="cifar", zero_init_residual=False)
    loss = model(torch.randn(2, 3, 16, 16)).logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = build_resnet(18, base_width=4, stem="cifar")
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for stage in (model.layer1, model.layer4) for b in stage)
    assert torch.count_nonzero(build_resnet(18, base_width=4, zero_init_residual=False).layer1[0].bn2.weight) > 0


def test_reset_classifier_is_zero_and_new_size():
    model = build_resnet(18, num_classes=10, base_width=4)
    model.reset_classifier(7)
    assert model.fc.weight.shape == (7, 32) and torch.count_nonzero(model.fc.weight) == 0
    assert model.cfg.num_classes == 7
    model.reset_classifier(0)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 32)


@pytest.mark.parametrize(
    "kwargs, message", [({"depth": 20}, "18, 34, 50"), ({"stem": "tiny"}, "imagenet, cifar"), ({"base_width": 0}, "base_width")]
)
def test_bad_config_says_what_is_valid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResNetConfig(**kwargs)


def test_wrong_input_channels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ResNet(ResNetConfig(depth=18, base_width=4))(torch.randn(2, 1, 32, 32))
