"""Session fixtures of the matrix: the tiny corpora, written once, and the shipped experiments' runs, each run once
and shared (the DeiT students distil from the shipped CNN teacher's run, fine-tuning starts from the shipped
pretraining run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.matrix._runs import CONF, Inputs, fit_args, last_checkpoint, starts_from, vitx

TEACHER = CONF / "cnn" / "teacher-shapes.yaml"  # the teacher of conf/deit/*.yaml (10 classes, 32 px, as theirs)
PRETRAINED = CONF / "vit" / "pretrain.yaml"  # the source of conf/vit/finetune.yaml (same width and depth)


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> Inputs:
    """32-px shapes (10 classes) and captioned shapes with a tokenizer: 4 training shards of 32 images (enough for
    2 ranks), 16 validation images (2 batches of 8 on one process, 1 per rank on two)."""
    from data_pipelines.tokenizer import train_tokenizer
    from data_pipelines.writers import write_synthetic
    from data_pipelines.writers_captions import write_synthetic_captions

    shapes, captions = tmp_path_factory.mktemp("matrix-shapes"), tmp_path_factory.mktemp("matrix-captions")
    write_synthetic(shapes, num_train=128, num_val=16, image_size=32, seed=0, shard_size=32)
    patterns = write_synthetic_captions(captions, num_train=128, num_val=16, image_size=32, seed=0, shard_size=32)
    # the demo's tokenizer settings (conf/clip/demo.yaml): at most 1024 tokens, 24 per caption
    train_tokenizer([patterns["train"]], captions / "tokenizer.json", vocab_size=1024, context_length=24)
    return Inputs(shapes=shapes, captions=captions)


class ShippedRuns:
    """`vitx fit` of a shipped experiment for one optimiser step, once per session; a failure is kept and
    reported to every test that needs the run."""

    def __init__(self, tmp_path_factory, corpora: Inputs) -> None:
        self.tmp, self.corpora = tmp_path_factory, corpora
        self.done: dict[Path, Path | BaseException] = {}

    def inputs(self, config: Path) -> Inputs:
        needs = starts_from(config)
        return Inputs(
            shapes=self.corpora.shapes, captions=self.corpora.captions,
            teacher=self.checkpoint(TEACHER) if "teacher" in needs else None,
            pretrained=self.checkpoint(PRETRAINED) if "pretrained" in needs else None,
        )

    def runs(self, config: Path) -> Path:
        """The runs folder of the experiment's one-step fit (runs/<name>/version_0 inside)."""
        config = Path(config)
        if config not in self.done:
            runs = self.tmp.mktemp(f"shipped-{config.parent.name}-{config.stem}")
            try:
                vitx(fit_args(config, self.inputs(config), runs, steps=1))
                self.done[config] = runs
            except BaseException as err:  # noqa: BLE001 - kept for every test that needs this run
                self.done[config] = err
                raise
        result = self.done[config]
        if isinstance(result, BaseException):
            raise RuntimeError(f"`vitx fit --config {config.relative_to(CONF.parent)}` failed: "
                               f"{type(result).__name__}: {result}") from result
        return result

    def checkpoint(self, config: Path) -> Path:
        return last_checkpoint(self.runs(config))


@pytest.fixture(scope="session")
def shipped(tmp_path_factory, corpora) -> ShippedRuns:
    return ShippedRuns(tmp_path_factory, corpora)
