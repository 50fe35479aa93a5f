"""CLIP pretraining end to end on a tiny captioned corpus: `vitx fit` of every conf/clip config, evaluation in
`vitx validate` from a checkpoint that carries its tokenizer, the temperature clamp, and the clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_pipelines.datamodules import ImageTextDataModule
from data_pipelines.tokenizer import CaptionTokenizer
from tests.conftest import REPO
from vit_experiments.cli import main
from vit_experiments.models.clip import CLIPConfig
from vit_experiments.models.text import TextConfig
from vit_experiments.models.vit import ViTConfig
from vit_experiments.tasks.contrastive import ContrastivePretraining
from vit_experiments.tasks.optim import OptimConfig

CONFIGS = sorted((REPO / "conf" / "clip").glob("*.yaml"))
DEMO = REPO / "conf" / "clip" / "demo.yaml"


@pytest.fixture(scope="module")
def corpus(tiny_captions) -> Path:
    return tiny_captions


def tiny_args(config: Path, corpus: Path, runs: Path, *extra: str) -> list[str]:
    """A config shrunk to seconds: 16-px images, one block per tower, 16 pairs a batch."""
    return [
        "--config", str(config),
        "--data.train_shards", str(corpus / "train-{000000..000001}.tar"),
        "--data.val_shards", str(corpus / "val-000000.tar"),
        "--data.batch_size", "16",
        "--data.num_workers", "0",
        "--model.tokenizer", str(corpus / "tokenizer.json"),
        "--model.clip.embed_dim", "16",
        "--model.clip.vision.image_size", "16",
        "--model.clip.vision.patch_size", "8",
        "--model.clip.vision.embed_dim", "32",
        "--model.clip.vision.depth", "1",
        "--model.clip.vision.num_heads", "2",
        "--model.clip.vision.mlp_dim", "64",
        "--model.clip.text.vocab_size", "300",
        "--model.clip.text.context_length", "24",
        "--model.clip.text.width", "32",
        "--model.clip.text.depth", "1",
        "--model.clip.text.num_heads", "2",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]


def scalars(log_dir: Path) -> dict[str, float]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def only_run(runs: Path) -> Path:
    (run_dir,) = [p for p in runs.glob("*/version_*")]
    return run_dir


@pytest.fixture(scope="module")
def demo_run(corpus, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    main(["fit", *tiny_args(DEMO, corpus, runs, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
                            # the attention analysis: numbers only, no figures (they take seconds)
                            "--analysis.log_images", "false", "--analysis.save_figures", "false",
                            "--analysis.at_start", "false")])
    return only_run(runs)


def test_demo_fit_logs_loss_temperature_zero_shot_and_retrieval(demo_run):
    tags = scalars(demo_run)
    for tag in ("train/loss", "train/logit_scale", "val/loss", "val/zeroshot/acc1", "val/zeroshot/acc5",
                "val/retrieval/image_to_text/R@1", "val/retrieval/text_to_image/R@10", "val/retrieval/mean_recall",
                "analysis/attention_distance/layer_01"):  # the ViT analyses, on the image tower
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert tags["train/logit_scale"] == pytest.approx(1 / 0.07, rel=0.05)  # exp(t), near its start after 4 steps
    assert 0.0 <= tags["val/zeroshot/acc1"] <= tags["val/zeroshot/acc5"] <= 1.0


def test_run_directory_and_checkpoint_carry_the_tokenizer(demo_run, corpus):
    saved = CaptionTokenizer.load(demo_run / "tokenizer.json")
    assert saved.to_str() == CaptionTokenizer.load(corpus / "tokenizer.json").to_str()
    ckpt = torch.load(demo_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert CaptionTokenizer.from_str(ckpt["vitx"]["tokenizer"]).to_str() == saved.to_str()
    assert ckpt["vitx"]["family"] == "clip" and ckpt["vitx"]["normalization"]["mean"]
    task = ContrastivePretraining.load_from_checkpoint(demo_run / "checkpoints" / "last.ckpt", tokenizer=None)
    assert task.tokenizer is not None and task.model.cfg.vision.image_size == 16


def test_validate_from_a_checkpoint_without_the_tokenizer_file(demo_run, corpus, tmp_path):
    """`vitx validate` restores the tokenizer from the checkpoint (no tokenizer file: `--model.tokenizer null` on
    the command line wins over the path in the checkpoint's hyperparameters) and runs the zero-shot and retrieval
    callbacks."""
    args = tiny_args(DEMO, corpus, tmp_path, "--model.tokenizer", "null")
    main(["validate", *args, "--ckpt_path", str(demo_run / "checkpoints" / "last.ckpt")])
    tags = scalars(only_run(tmp_path))
    assert {"val/loss", "val/zeroshot/acc1", "val/retrieval/text_to_image/R@1"} <= tags.keys()


@pytest.mark.parametrize("config", [c for c in CONFIGS if c != DEMO], ids=lambda p: p.name)
def test_few_step_fit_of_every_other_config(config, corpus, tmp_path):
    main(["fit", *tiny_args(config, corpus, tmp_path, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1")])
    tags = scalars(only_run(tmp_path))
    assert {"train/loss", "val/loss", "val/retrieval/text_to_image/R@1"} <= tags.keys()


def tiny_task(**optim) -> ContrastivePretraining:
    clip = CLIPConfig(
        embed_dim=16,
        vision=ViTConfig(variant=None, image_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                         num_classes=0, pre_norm=True, patch_bias=False),
        text=TextConfig(vocab_size=300, context_length=24, width=32, depth=1, num_heads=2),
    )
    return ContrastivePretraining(clip, optim=OptimConfig(**optim))


def test_clamp_holds_after_every_step_with_a_huge_learning_rate(corpus, tmp_path):
    """The shipped task with a fault injected into its temperature's gradient: every step asks for a larger logit
    scale and overshoots the ceiling."""
    task = ContrastivePretraining(tiny_task().model.cfg, tokenizer=str(corpus / "tokenizer.json"),
                                  optim=OptimConfig(lr=10.0, warmup_steps=0))
    task.model.logit_scale.register_hook(lambda grad: grad - 100.0)  # descent now raises the logit scale
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(pl_module.model.logit_scale.item())

    dm = ImageTextDataModule(str(corpus / "train-{000000..000001}.tar"), batch_size=16, image_size=16, num_workers=0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    assert seen == pytest.approx([math.log(100.0)] * 3)  # pinned at the ceiling: each step went above it


def test_caption_strings_are_tokenised_on_the_accelerator(corpus):
    task = tiny_task()
    tok = CaptionTokenizer.load(corpus / "tokenizer.json")
    task.set_tokenizer(tok)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out_images, ids, valid = task.on_after_batch_transfer((images, ["a red star.", "a blue ring."]), 0)
    assert torch.equal(ids, tok(["a red star.", "a blue ring."])) and valid.all()
    assert out_images.dtype == torch.float32


def test_tokenizer_larger_than_the_embedding_is_a_clear_error(corpus):
    task = ContrastivePretraining(CLIPConfig(
        embed_dim=16,
        vision=ViTConfig(variant=None, image_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
        text=TextConfig(vocab_size=100, context_length=24, width=32, depth=1, num_heads=2)))
    with pytest.raises(ValueError, match="vocab_size"):
        task.set_tokenizer(CaptionTokenizer.load(corpus / "tokenizer.json"))


def test_missing_tokenizer_says_how_to_make_one(corpus, tmp_path):
    args = tiny_args(DEMO, corpus, tmp_path, "--model.tokenizer", str(tmp_path / "none.json"),
                     "--trainer.max_steps", "1")
    with pytest.raises(FileNotFoundError, match="vitx data train-tokenizer"):
        main(["fit", *args])


def test_retrieval_captions_split_at_newlines_only():
    """A caption holding U+2028 (LINE SEPARATOR) or U+0085 is one caption in retrieval, as in training."""
    import io
    import random

    from PIL import Image

    from vit_experiments.callbacks.contrastive_eval import AllCaptionsDecoder

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
    txt = "a red\u2028square\nthe second\x85caption\n\n".encode("utf-8")
    _, captions, valid = AllCaptionsDecoder(16).decode({"jpg": buf.getvalue(), "txt": txt}, random.Random(0), 0,
                                                      False)
    assert valid and captions == ["a red\u2028square", "the second\x85caption"]


def test_validate_after_the_tokenizer_file_moved(demo_run, corpus, tmp_path):
    """The checkpoint names a tokenizer file that is gone: restoring uses the tokenizer inside the checkpoint."""
    gone = tmp_path / "moved" / "tokenizer.json"
    args = tiny_args(DEMO, corpus, tmp_path, "--model.tokenizer", str(gone))
    main(["validate", *args, "--ckpt_path", str(demo_run / "checkpoints" / "last.ckpt")])
    assert "val/zeroshot/acc1" in scalars(only_run(tmp_path))
