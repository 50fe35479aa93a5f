"""Imported CLIPs at vitx's other entry points: `vitx analyze` (the image tower) and `--model.init_from` of
ContrastivePretraining (both towers)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from data_pipelines.tokenizer import CaptionTokenizer  # noqa: E402
from tests.checkpoints.clip_fixtures import hf_clip, hf_tokenizer  # noqa: E402
from vit_experiments.analyze import load_vit, main_analyze  # noqa: E402
from vit_experiments.checkpoints import read_checkpoint  # noqa: E402
from vit_experiments.tasks.contrastive import ContrastivePretraining  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-clip")
    model = hf_clip("quick_gelu", seed=2)
    model.save_pretrained(out)
    hf_tokenizer(tmp_path_factory.mktemp("vocab")).save_pretrained(out)
    return out, model


def test_analyze_reads_the_image_tower(folder, tmp_path):
    path, model = folder
    vit, info = load_vit(str(path))
    assert info.source == "hf-clip" and vit.cfg.num_heads == 3 and vit.cfg.pre_norm and vit.cfg.act == "quick_gelu"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the class token after the final norm is transformers' pooled output
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        torch.testing.assert_close(vit.forward_head(vit.forward_features(pixels), pre_logits=True), pooled,
                                   atol=1e-5, rtol=1e-5)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    assert main_analyze(["--ckpt", str(path), "--images", str(images), "--out", str(out), "--num-images", "2",
                         "--probe-images", "2", "--device", "cpu"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert (data["layout"], data["family"], data["num_heads"]) == ("hf-clip", "clip", 3)


def test_contrastive_pretraining_starts_from_an_imported_clip(folder):
    path, _ = folder
    info = read_checkpoint(str(path))
    task = ContrastivePretraining(clip=info.config, init_from=str(path))
    own = task.model.state_dict()
    assert set(own) == set(info.state_dict) and all(torch.equal(own[k], info.state_dict[k]) for k in own)
    # a config whose activation differs from the weights' loads them, and says so
    other = dataclasses.replace(info.config, vision=dataclasses.replace(info.config.vision, act="gelu"))
    notes = ContrastivePretraining(clip=other, init_from=str(path)).init_notes
    assert any("act" in n and "quick_gelu" in n for n in notes), notes


def test_contrastive_pretraining_takes_the_imported_tokenizer_file(folder):
    from lightning.pytorch import Trainer

    path, _ = folder
    info = read_checkpoint(str(path))
    task = ContrastivePretraining(clip=info.config, init_from=str(path), tokenizer=str(path / "tokenizer.json"))
    task.trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False)
    task.setup("fit")  # the Hugging Face tokenizer.json, at the text tower's context length (16)
    ids = task.tokenize(["a photo of a dog."])
    assert ids.shape == (1, 16) and task.tokenizer.eot_id == info.config.text.eot_token_id
    assert torch.equal(ids, CaptionTokenizer.from_str(info.tokenizer)(["a photo of a dog."]))
