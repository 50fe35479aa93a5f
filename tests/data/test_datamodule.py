"""ImageLabelDataModule and ImageTextDataModule: synthesis on demand, class files, batch format, errors."""

from __future__ import annotations

import re

import pytest
import torch

from data_pipelines.datamodules import ImageLabelDataModule, ImageTextDataModule
from data_pipelines.synthetic import CLASS_NAMES
from data_pipelines.writers_csv import write_caption_corpus

from .conftest import jpeg


def test_synthesize_if_missing_and_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo corpus lives at data/shapes, relative to where vitx runs
    dm = ImageLabelDataModule(
        train_shards="data/shapes/train-{000000..000003}.tar",
        val_shards=str(tmp_path / "data/shapes/val-{000000..000001}.tar"),  # the same place, spelled absolute
        batch_size=16, image_size=16, num_workers=0, synthesize_if_missing=True,
        synth_train_samples=100, synth_val_samples=30,
    )
    dm.prepare_data()
    # the synthetic corpus is written with exactly as many shards as the patterns name
    assert sorted(p.name for p in (tmp_path / "data/shapes").glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar", "val-000000.tar", "val-000001.tar",
    ]
    dm.setup("fit")
    assert dm.num_classes == len(CLASS_NAMES) and dm.class_names == CLASS_NAMES
    assert len(dm.mean) == 3 and len(dm.std) == 3
    train = dm.train_dataloader()
    assert len(train) == 100 // 16
    images, labels = next(iter(train))
    assert images.shape == (16, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.shape == (16,) and labels.dtype == torch.int64
    val = list(dm.val_dataloader())
    assert sum(len(y) for _, y in val) == 30
    stats = dm.data_stats()
    assert stats["data/val_samples_read"] == 30 and stats["data/val_samples_skipped"] == 0


@pytest.mark.parametrize("train", [
    "data/shapse/train-{000000..000019}.tar",  # a typo in the directory
    "data/shapes/trian-{000000..000019}.tar",  # a typo in the file name
    "data/shapes/train-{000001..000019}.tar",  # not what the writer makes
    "elsewhere/train-{000000..000019}.tar",  # someone's real corpus, not made yet
])
def test_synthesis_writes_only_the_demo_corpus_at_its_own_place(tmp_path, monkeypatch, train):
    """Issue 14, finding 10: with synthesize_if_missing (on in the shipped demo configs) a typo in train_shards
    wrote the synthetic corpus at the typo's path and trained on it, exit 0."""
    monkeypatch.chdir(tmp_path)
    dm = ImageLabelDataModule(train_shards=train, val_shards="data/shapes/val-{000000..000001}.tar",
                              synthesize_if_missing=True, synth_train_samples=40, synth_val_samples=10)
    with pytest.raises(FileNotFoundError, match=r"(?s)" + re.escape(repr(train)) + r".*only .*data/shapes/train-"):
        dm.prepare_data()
    assert not list(tmp_path.rglob("*.tar")) and not (tmp_path / "data").exists()


def test_missing_shards_fail_at_setup_with_the_pattern(tmp_path):
    pattern = str(tmp_path / "nope/train-{000000..000003}.tar")
    dm = ImageLabelDataModule(train_shards=pattern, val_shards=pattern, num_workers=0)
    dm.prepare_data()  # synthesize_if_missing is off: nothing written
    with pytest.raises(FileNotFoundError, match="nope/train-"):
        dm.setup("fit")


def test_num_classes_without_class_file(tmp_path, shards):
    pattern = shards([8])
    dm = ImageLabelDataModule(train_shards=pattern, val_shards=pattern, num_workers=0, image_size=8)
    with pytest.raises(ValueError, match="num_classes"):
        dm.num_classes
    assert ImageLabelDataModule(train_shards=pattern, val_shards=pattern, num_classes=3).num_classes == 3


def test_image_text_datamodule(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        (images / f"im{i}.jpg").write_bytes(jpeg(i, 24))
    (tmp_path / "caps.tsv").write_text("".join(f"im{i}.jpg\tcap {j} of {i}\n" for i in range(12) for j in range(2)))
    patterns = write_caption_corpus(tmp_path / "caps.tsv", images, tmp_path / "out", val_fraction=0.25)
    dm = ImageTextDataModule(train_shards=patterns["train"], val_shards=patterns["val"], batch_size=3,
                             image_size=16, num_workers=0, caption="cycle")
    dm.setup("fit")
    images_b, texts, valid = next(iter(dm.train_dataloader()))
    assert images_b.shape == (3, 3, 16, 16) and len(texts) == 3 and valid.all()
    assert all(t.startswith("cap ") for t in texts)
    val = list(dm.val_dataloader())
    assert sum(len(t) for _, t, _ in val) == 3 and all(t.startswith("cap 0 ") for _, ts, _ in val for t in ts)


def test_skipped_samples_reach_the_logger(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers.logger import Logger

    from data_pipelines.datamodules import DataStatsLogger

    from .conftest import write_tar

    samples = [{"__key__": f"k{i:03d}", "jpg": jpeg(i), "cls": str(i % 2).encode()} for i in range(64)]
    samples[5]["jpg"] = b"broken"
    write_tar(tmp_path / "train-000000.tar", samples)

    class Capture(Logger):
        name, version = "capture", 0
        metrics: list = []

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

        def log_hyperparams(self, *args, **kwargs):
            pass

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 8 * 8, 2)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.lin(x.float().flatten(1)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    pattern = str(tmp_path / "train-000000.tar")
    dm = ImageLabelDataModule(train_shards=pattern, val_shards=pattern, batch_size=8, image_size=8, num_workers=1,
                              num_classes=2, max_error_rate=0.1)
    logger = Capture()
    trainer = L.Trainer(max_epochs=1, logger=logger, callbacks=[DataStatsLogger(every_n_steps=1)], limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=dm)
    skipped = [m["data/train_samples_skipped"] for m in logger.metrics if "data/train_samples_skipped" in m]
    assert skipped and skipped[-1] == 1
    assert dm.bad_shards()["train"] == {"train-000000.tar": 1}


def test_pattern_naming_part_of_a_shard_set_warns(tmp_path, shards, caplog):
    pattern = shards([4, 4, 4, 4])  # train-{000000..000003}
    partial = pattern.replace("000003", "000001")
    dm = ImageLabelDataModule(train_shards=partial, val_shards=partial, num_workers=0, image_size=8, num_classes=16)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert "names 2 of the 4 'train-*' shards" in caplog.text


def test_too_few_shards_for_the_workers_fails_when_the_loader_is_made(shards):
    pattern = shards([16])
    dm = ImageLabelDataModule(train_shards=pattern, val_shards=pattern, num_workers=2, image_size=8, num_classes=16)
    dm.setup("fit")
    with pytest.raises(ValueError, match="1 training shard.*fewer\\s+workers"):
        dm.train_dataloader()
    assert len(list(dm.val_dataloader())) == 1  # validation is fine with fewer shards than workers


# every argument a YAML config may set under data.init_args, per datamodule (the shared ones live in the base)
SHARED_ARGS = {
    "train_shards", "val_shards", "batch_size", "image_size", "num_workers", "shuffle_buffer", "seed",
    "train_samples", "val_samples", "max_error_rate", "resampled", "train_crop_scale", "train_crop_ratio",
    "eval_crop_pct", "fast_train_decode", "max_image_pixels", "normalization", "mean", "std", "pin_memory", "persistent_workers",
    "prefetch_factor", "allow_pipe", "remote_retries", "remote_backoff",
}
OWN_ARGS = {
    ImageLabelDataModule: {"num_classes", "synthesize_if_missing", "synth_train_samples", "synth_val_samples",
                           "synth_shard_size"},
    ImageTextDataModule: {"caption", "val_caption", "tokenizer"},
}


@pytest.mark.parametrize("cls", [ImageLabelDataModule, ImageTextDataModule])
def test_every_argument_is_visible_to_the_cli_with_type_and_help(cls):
    """jsonargparse follows the subclasses' **kwargs into the shared base: `--data.help` and --print_config list
    every argument, each with its help text, and the subclasses keep their own defaults."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    actions = {a.dest.split(".", 1)[1]: a for a in parser._actions if a.dest.startswith("data.")}
    actions = {k: a for k, a in actions.items() if not k.endswith(".help") and k != "__path__"}
    assert set(actions) == SHARED_ARGS | OWN_ARGS[cls]
    assert all(a.help and len(a.help) > 10 for a in actions.values()), [k for k, a in actions.items() if not a.help]
    assert "type: Optional[int]" in parser.format_help()  # types are shown too
    defaults = parser.get_defaults().data
    expected = {ImageLabelDataModule: ("imagenet", None, 0.875), ImageTextDataModule: ("clip", (0.9, 1.0), 1.0)}[cls]
    assert (defaults.normalization, defaults.train_crop_scale, defaults.eval_crop_pct) == expected


def test_class_names_and_shared_properties_of_both_datamodules(tmp_path, shards):
    from data_pipelines.metadata import write_classes

    pattern = shards([4])
    for cls in (ImageLabelDataModule, ImageTextDataModule):
        dm = cls(train_shards=pattern, val_shards=pattern, image_size=8, num_workers=0)
        assert dm.class_names is None and dm.image_size == 8 and len(dm.mean) == len(dm.std) == 3
    assert ImageTextDataModule(train_shards=pattern).num_classes is None
    write_classes(tmp_path / "shards", ["a", "b"])
    for cls in (ImageLabelDataModule, ImageTextDataModule):
        dm = cls(train_shards=pattern, val_shards=pattern)
        assert dm.class_names == ["a", "b"] and dm.num_classes == 2
        assert dm.hparams.batch_size == 64 and dm.hparams.train_shards == pattern
    with pytest.raises(TypeError):
        ImageLabelDataModule(pattern, pattern, 64)  # only the shard patterns are positional
