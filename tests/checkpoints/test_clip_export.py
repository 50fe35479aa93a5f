"""`vitx export` of CLIPs: a Hugging Face folder that transformers.CLIPModel loads with outputs equal to the model
it came from, open_clip's key layout, and vitx's own CLIP (its end token renumbered) through both."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_pipelines.tokenizer import CaptionTokenizer  # noqa: E402
from tests.checkpoints.clip_fixtures import (  # noqa: E402
    CORPUS, OPENAI_SIZE, assert_same, hf_clip, hf_tokenizer, openai_state_dict, reference, vitx_outputs,
    write_openai_merges,
)
from vit_experiments.checkpoints import METADATA_KEY, network_metadata, read_checkpoint  # noqa: E402
from vit_experiments.export import main_export  # noqa: E402
from vit_experiments.models.clip import CLIP, CLIPConfig  # noqa: E402
from vit_experiments.models.text import TextConfig  # noqa: E402
from vit_experiments.models.vit import ViTConfig  # noqa: E402

CAPTIONS = ["a photo of a dog.", "Two RED cats", "itap of a blue circle"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_hugging_face_round_trip(images, tmp_path):
    model = hf_clip("gelu")
    model.save_pretrained(tmp_path / "in")
    tokenizer = hf_tokenizer(tmp_path / "vocab")
    tokenizer.save_pretrained(tmp_path / "in")
    assert main_export(["--ckpt", str(tmp_path / "in"), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    again = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    exported_tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "out")
    assert exported_tokenizer(CAPTIONS)["input_ids"] == tokenizer(CAPTIONS)["input_ids"]
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    assert_same(reference(model, images, ids), reference(again, images, ids))


def test_openai_weights_to_hugging_face_and_open_clip(images, tmp_path):
    model = hf_clip("quick_gelu", **OPENAI_SIZE)
    torch.save(openai_state_dict(model), tmp_path / "ViT-T-8.pt")
    write_openai_merges(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    ckpt = str(tmp_path / "ViT-T-8.pt")
    assert main_export(["--ckpt", ckpt, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    again = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    info = read_checkpoint(ckpt)
    captions = CaptionTokenizer.from_str(info.tokenizer)(CAPTIONS)
    assert_same(reference(model, images, captions), reference(again, images, captions))
    # OpenAI reads the highest id, and so does the export (eos_token_id 2): equal on any ids, end token or not
    ids = torch.randint(1, 400, (3, 16), generator=torch.Generator().manual_seed(6))
    assert_same(vitx_outputs(info.build(), images, ids), reference(again, images, ids))
    # open_clip's layout is OpenAI's: the same keys and tensors as the file read
    assert main_export(["--ckpt", ckpt, "--format", "open_clip", "--out", str(tmp_path / "oc.bin")]) == 0
    written, source = torch.load(tmp_path / "oc.bin", weights_only=True), openai_state_dict(model)
    assert set(written) == set(source) and all(torch.equal(written[k], source[k]) for k in source)


def _vitx_checkpoint(path):
    """A CLIP as `vitx fit` saves it, with vitx's own tokenizer (end token id 2)."""
    tokenizer = CaptionTokenizer.train(CORPUS * 3, vocab_size=300, context_length=16)
    torch.manual_seed(7)
    cfg = CLIPConfig(embed_dim=24, vision=ViTConfig(variant=None, image_size=32, patch_size=8, embed_dim=48, depth=2,
                                                    num_heads=3, mlp_dim=96, pre_norm=True, patch_bias=False,
                                                    norm_eps=1e-5),
                     text=TextConfig(vocab_size=320, context_length=16, width=32, depth=2, num_heads=4))
    model = CLIP(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.1)
    meta = {**network_metadata(cfg), "tokenizer": tokenizer.to_str()}
    torch.save({METADATA_KEY: meta, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, tokenizer


def test_vitx_clip_through_both_layouts(images, tmp_path):
    model, tokenizer = _vitx_checkpoint(tmp_path / "last.ckpt")
    expected = vitx_outputs(model, images, tokenizer(CAPTIONS))
    ckpt = str(tmp_path / "last.ckpt")
    assert main_export(["--ckpt", ckpt, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    renumbered = CaptionTokenizer.load(tmp_path / "hf" / "tokenizer.json")  # the end token moved to the top id
    assert renumbered.eot_id == renumbered.vocab_size - 1 != tokenizer.eot_id
    assert_same(expected, reference(hf, images, renumbered(CAPTIONS)))
    assert main_export(["--ckpt", ckpt, "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    info = read_checkpoint(str(tmp_path / "oc"))  # open_clip_config.json + open_clip_pytorch_model.bin
    assert info.source == "open_clip" and info.config.text.eot_pooling == "argmax"
    assert_same(expected, vitx_outputs(info.build(), images, CaptionTokenizer.from_str(info.tokenizer)(CAPTIONS)))
    assert main_export(["--ckpt", ckpt, "--format", "timm", "--out", str(tmp_path / "x.pth")]) == 2
