"""Pretrained CLIP of other libraries read through read_checkpoint: outputs equal to transformers.CLIPModel's.

The Hugging Face folder is written by save_pretrained; the OpenAI and open_clip files are the same random
transformers model written in openai/CLIP's key layout (clip_fixtures.openai_state_dict). Tolerance 1e-5 in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_pipelines.tokenizer import CaptionTokenizer  # noqa: E402
from tests.checkpoints.clip_fixtures import (  # noqa: E402
    EOT, OPENAI_SIZE, assert_same, hf_clip, hf_tokenizer, openai_state_dict, reference, vitx_outputs,
    write_openai_merges,
)
from vit_experiments.checkpoints import read_checkpoint  # noqa: E402
from vit_experiments.checkpoints.clip_readers import clip_overrides  # noqa: E402

CAPTIONS = ["a photo of a dog.", "Two RED cats", "itap of a blue circle", "the dog's photo " * 6]


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-clip")
    model = hf_clip("gelu")
    model.save_pretrained(folder)
    hf_tokenizer(tmp_path_factory.mktemp("vocab")).save_pretrained(folder)
    return folder, model


def test_hugging_face_folder_equals_transformers(hf_folder, images):
    folder, model = hf_folder
    info = read_checkpoint(str(folder))
    assert (info.source, info.family) == ("hf-clip", "clip")
    cfg = info.config
    # the heads from config.json (not width // 64), the activation from hidden_act, the end token from eos_token_id
    assert (cfg.vision.num_heads, cfg.text.num_heads, cfg.vision.act, cfg.text.act) == (3, 4, "gelu", "gelu")
    assert (cfg.text.eot_token_id, cfg.text.eot_pooling, cfg.embed_dim) == (EOT, "first", 24)
    tokenizer = CaptionTokenizer.from_str(info.tokenizer)  # the tokenizer.json saved beside the weights
    ids = tokenizer(CAPTIONS)
    assert_same(reference(model, images, ids), vitx_outputs(info.build(), images, ids))


def test_hugging_face_weights_file_with_its_config_beside_it(hf_folder, images, tmp_path):
    folder, model = hf_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "weights.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    info = read_checkpoint(str(tmp_path / "weights.safetensors"))
    assert info.source == "hf-clip" and info.tokenizer is None
    ids = torch.randint(0, EOT, (2, 16))
    ids[:, 7] = EOT
    assert_same(reference(model, images, ids), vitx_outputs(info.build(), images, ids))


def test_old_hugging_face_config_with_eos_2_reads_the_argmax(images, tmp_path):
    # transformers pools at the highest id for configs written before eos_token_id was fixed (it was 2)
    model = hf_clip("quick_gelu", eos_token_id=2)
    model.save_pretrained(tmp_path)
    info = read_checkpoint(str(tmp_path))
    assert info.config.text.eot_pooling == "argmax" and info.config.text.act == "quick_gelu"
    ids = torch.randint(1, EOT, (4, 16), generator=torch.Generator().manual_seed(2))  # no end token at all
    assert_same(reference(model, images, ids), vitx_outputs(info.build(), images, ids))


def test_openai_state_dict_reads_as_quick_gelu(images, tmp_path):
    model = hf_clip("quick_gelu", **OPENAI_SIZE)
    state = openai_state_dict(model)
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(EOT + 1))
    torch.save(state, tmp_path / "ViT-T-8.pt")  # as in OpenAI's archives, with their three constants
    write_openai_merges(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    info = read_checkpoint(str(tmp_path / "ViT-T-8.pt"))
    cfg = info.config
    assert info.source == "openai" and (cfg.vision.act, cfg.text.act) == ("quick_gelu", "quick_gelu")
    assert (cfg.vision.num_heads, cfg.text.num_heads) == (2, 1)  # width // 64
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.text.context_length) == (32, 8, 16)
    assert cfg.text.eot_pooling == "argmax" and cfg.text.eot_token_id == EOT
    assert any("quick_gelu" in n for n in info.notes)
    ids = CaptionTokenizer.from_str(info.tokenizer)(CAPTIONS)
    assert_same(reference(model, images, ids), vitx_outputs(info.build(), images, ids))
    # the override wins, and the exact GELU gives other outputs for these weights
    with clip_overrides(act="gelu"):
        other = read_checkpoint(str(tmp_path / "ViT-T-8.pt"))
    assert other.config.text.act == "gelu"
    assert not torch.allclose(vitx_outputs(other.build(), images, ids)["text"], reference(model, images, ids)["text"])


def test_open_clip_training_checkpoint_with_module_prefix(images, tmp_path):
    model = hf_clip("gelu", **OPENAI_SIZE)
    state = {"module." + k: v for k, v in openai_state_dict(model).items()}
    torch.save({"epoch": 2, "name": "my-run", "state_dict": state, "optimizer": {}}, tmp_path / "epoch_2.pt")
    info = read_checkpoint(str(tmp_path / "epoch_2.pt"))
    assert info.source == "open_clip" and info.config.text.act == "gelu"  # open_clip's default
    assert info.tokenizer is None and any("tokenizer" in n for n in info.notes)
    ids = torch.randint(1, EOT, (3, 16), generator=torch.Generator().manual_seed(3))
    ids[:, 5] = EOT
    assert_same(reference(model, images, ids), vitx_outputs(info.build(), images, ids))


def test_open_clip_folder_with_quickgelu_config(images, tmp_path):
    model = hf_clip("quick_gelu", widths=(48, 32), heads=(3, 4))
    torch.save(openai_state_dict(model), tmp_path / "open_clip_pytorch_model.bin")
    config = {"model_cfg": {"embed_dim": 24, "quick_gelu": True,
                            "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
                            "text_cfg": {"context_length": 16, "vocab_size": EOT + 1, "width": 32, "heads": 4,
                                         "layers": 2}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    hf_tokenizer(tmp_path / "vocab").save_pretrained(tmp_path)
    info = read_checkpoint(str(tmp_path))
    assert info.source == "open_clip" and info.config.text.act == "quick_gelu"
    assert (info.config.vision.num_heads, info.config.text.num_heads) == (3, 4)  # from the config
    assert info.normalization == {"mean": [0.5] * 3, "std": [0.25] * 3}
    ids = CaptionTokenizer.from_str(info.tokenizer)(CAPTIONS)
    assert_same(reference(model, images, ids), vitx_outputs(info.build(), images, ids))


def test_what_cannot_be_read_is_named(tmp_path):
    model = hf_clip("gelu")  # widths 48 and 32: no 64-wide heads, and no config to name them
    torch.save(openai_state_dict(model), tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="VITX_CLIP_VISION_HEADS"):
        read_checkpoint(str(tmp_path / "clip.pt"))
    with clip_overrides(vision_heads=3, text_heads=4):
        assert read_checkpoint(str(tmp_path / "clip.pt")).config.text.num_heads == 4
    state = openai_state_dict(model)
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(48)
    torch.save(state, tmp_path / "layer_scale.pt")
    with pytest.raises(ValueError, match="layer scale"), clip_overrides(vision_heads=3, text_heads=4):
        read_checkpoint(str(tmp_path / "layer_scale.pt"))
    resnet = {"visual.layer1.0.conv1.weight": torch.zeros(1), "token_embedding.weight": torch.zeros(4, 4)}
    torch.save(resnet, tmp_path / "RN50.pt")
    with pytest.raises(ValueError, match="ResNet"):
        read_checkpoint(str(tmp_path / "RN50.pt"))


def test_openai_torchscript_archive_when_trusted(images, tmp_path):
    class Node(torch.nn.Module):  # an archive of modules named as in OpenAI's, holding the weights
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = hf_clip("quick_gelu", **OPENAI_SIZE)
    root = Node()
    for key, value in openai_state_dict(model).items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, Node())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    torch.jit.script(root).save(str(tmp_path / "ViT-T-8.pt"))
    with pytest.raises(ValueError, match="trust-checkpoint"):  # TorchScript is not restricted to tensors
        read_checkpoint(str(tmp_path / "ViT-T-8.pt"))
    info = read_checkpoint(str(tmp_path / "ViT-T-8.pt"), trust=True)
    assert info.source == "openai" and info.config.text.act == "quick_gelu"
    ids = torch.randint(1, EOT, (2, 16), generator=torch.Generator().manual_seed(4))
    ids[:, 9] = EOT
    assert_same(reference(model, images, ids), vitx_outputs(info.build(), images, ids))
