"""`vitx zeroshot` on imported CLIPs: a Hugging Face folder scored on a class folder and on captioned shards gives
the accuracy and retrieval recall computed from transformers.CLIPModel's own embeddings of the same images and
prompts; OpenAI weights take their tokenizer from --tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")

from data_pipelines.shards import iter_shard  # noqa: E402
from data_pipelines.transforms import CLIP_MEAN, CLIP_STD, decode_eval, normalize  # noqa: E402
from data_pipelines.writers_captions import write_synthetic_captions  # noqa: E402
from tests.checkpoints.clip_fixtures import (  # noqa: E402
    OPENAI_SIZE, hf_clip, hf_tokenizer, openai_state_dict, write_openai_merges,
)
from vit_experiments.evaluation import retrieval_recall  # noqa: E402
from vit_experiments.zeroshot import main_zeroshot  # noqa: E402

CLASSES = ["blue square", "cat", "dog", "red circle"]  # the sorted sub-directories


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-clip")
    model = hf_clip("gelu", seed=1)
    model.save_pretrained(folder)
    tokenizer = hf_tokenizer(tmp_path_factory.mktemp("vocab"))
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name.replace(" ", "_")).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name.replace(" ", "_") / f"{i}.png")
    return root


def hf_image_embeds(model, blobs: list[bytes]) -> torch.Tensor:
    """transformers' unit image embeddings of the images as vitx zeroshot prepares them (resize, centre crop)."""
    pixels = torch.from_numpy(np.stack([decode_eval(b, 32, 1.0) for b in blobs])).permute(0, 3, 1, 2)
    with torch.no_grad():
        return F.normalize(model.get_image_features(pixel_values=normalize(pixels, CLIP_MEAN, CLIP_STD)).pooler_output, dim=-1)


def hf_text_embeds(model, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(model.get_text_features(**ids).pooler_output, dim=-1)


def test_hugging_face_folder_zeroshot_equals_transformers(imported, class_folder, tmp_path):
    folder, model, tokenizer = imported
    out = tmp_path / "zs.json"
    assert main_zeroshot(["--ckpt", str(folder), "--images", str(class_folder), "--templates", "simple",
                          "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    names = res["image_names"]
    blobs = [(class_folder / n).read_bytes() for n in names]
    labels = torch.tensor([CLASSES.index(n.split("/")[0].replace("_", " ")) for n in names])
    classifier = hf_text_embeds(model, tokenizer, [f"a photo of a {c}." for c in CLASSES])  # one template
    pred = (hf_image_embeds(model, blobs) @ classifier.T).argmax(1)
    assert len(set(pred.tolist())) > 2  # varied predictions, so that equal accuracies mean equal predictions
    cls = res["classification"]
    assert cls["class_names"] == CLASSES
    assert cls["acc1"] == pytest.approx((pred == labels).float().mean().item())
    for c, name in enumerate(CLASSES):
        assert cls["per_class"][name]["acc1"] == pytest.approx((pred[labels == c] == c).float().mean().item())


def test_retrieval_on_captioned_shards_equals_transformers(imported, tmp_path):
    folder, model, tokenizer = imported
    write_synthetic_captions(tmp_path / "shards", num_train=1, num_val=12, image_size=24, shard_size=16,
                             captions_per_image=2)
    shard = str(next((tmp_path / "shards").glob("val-*.tar")))
    out = tmp_path / "zs.json"
    assert main_zeroshot(["--ckpt", str(folder), "--images", shard, "--templates", "simple", "--device", "cpu",
                          "--out", str(out)]) == 0
    ret = json.loads(out.read_text())["retrieval"]
    samples = [s for _, s, _ in iter_shard(shard)]
    captions = [c for s in samples for c in s["txt"].decode().strip().split("\n")]
    owner = torch.tensor([i for i, s in enumerate(samples) for _ in s["txt"].decode().strip().split("\n")])
    expected = retrieval_recall(hf_image_embeds(model, [s["jpg"] for s in samples]),
                                hf_text_embeds(model, tokenizer, captions), owner, ks=(1, 5, 10))
    assert ret["num_captions"] == len(captions)
    for key, value in expected.items():
        assert ret[key] == pytest.approx(value), key


def test_openai_weights_take_the_tokenizer_given(class_folder, tmp_path, capsys):
    torch.save(openai_state_dict(hf_clip("quick_gelu", **OPENAI_SIZE)), tmp_path / "ViT-T-8.pt")
    args = ["--ckpt", str(tmp_path / "ViT-T-8.pt"), "--images", str(class_folder), "--device", "cpu"]
    assert main_zeroshot(args) == 2
    assert "--tokenizer" in capsys.readouterr().err
    merges = write_openai_merges(tmp_path / "elsewhere.txt.gz")
    assert main_zeroshot([*args, "--tokenizer", str(merges), "--templates", "clip-imagenet-80"]) == 0
    err = capsys.readouterr().err
    assert "quick_gelu" in err  # the activation chosen for OpenAI's weights is reported
    assert main_zeroshot([*args, "--tokenizer", str(merges), "--act", "gelu", "--templates", "simple"]) == 0
    assert "activation" not in capsys.readouterr().err  # given, so not inferred
