"""LightningDataModules over the streaming layer: image-label (ViT, DeiT) and image-text (CLIP) corpora.

Both are thin: they resolve shard patterns, read the size and class files, build a `ShardStream` per split
with the right `SampleDecoder`, and wrap it in a `StreamLoader`. Batches leave the loader as uint8 images
(normalise and flip them on the accelerator with `transforms.normalize` / `transforms.random_hflip`).

Runs resume exactly: every checkpoint holds the training loader's position (every rank's, in its epoch; the
datamodule's `state_dict`), and a fit resumed from it reads exactly the batches an uninterrupted fit would, with
the same samples, order and augmentation, in that epoch and the following ones. The datamodule tells the loader
how many of the epoch's batches the trainer has used (`_train_batches_done`).

Under data parallelism validation batches may contain padding so that every rank runs the same number of
batches: image-label padding has label IGNORE_INDEX (-100), image-text padding has valid=False. Metrics
that skip padding equal their single-process values.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import lightning as L
import torch

from .constants import IGNORE_INDEX
from .demo import write_demo_corpus
from .metadata import read_classes, unlisted_shards
from .samples import ImageLabelDecoder, ImageTextDecoder
from .shards import BACKOFF, RETRIES
from .loader import StreamLoader
from .streaming import ShardStream
from .transforms import MAX_IMAGE_PIXELS, mean_std
from .urls import expand_urls

log = logging.getLogger(__name__)

__all__ = ["ImageLabelDataModule", "ImageTextDataModule", "DataStatsLogger", "IGNORE_INDEX"]


_warned_patterns: set[str] = set()


def _warn_if_pattern_names_a_subset(pattern: str, urls: list[str]) -> None:
    """A brace pattern written for 10 shards silently reads half of a 20-shard set; say so (once)."""
    if pattern not in _warned_patterns and (message := unlisted_shards(urls)):
        _warned_patterns.add(pattern)
        log.warning("%r %s", pattern, message)


class _StreamingDataModule(L.LightningDataModule):
    """What both datamodules share: their common arguments, shard resolution, rank/world from the trainer,
    loaders, class names, read/skip statistics. A subclass adds its own arguments and its `_decoder`.

    Args:
        train_shards: training shards: a brace pattern (`dir/train-{000000..000099}.tar`), '::'-separated
            patterns, http(s):// or cloud URLs.
        val_shards: validation shards, same forms.
        batch_size: samples per batch per device.
        image_size: side of the square images the model sees.
        num_workers: dataloader worker processes per device (0 reads in the main process).
        shuffle_buffer: training samples shuffled together in each worker's buffer (raw bytes are buffered).
        seed: seeds shard order, sample shuffle and augmentation together with the epoch and rank.
        train_samples: training epoch size; needed when there is no sizes.json (and for resampled streams),
            caps the epoch when smaller than the corpus.
        val_samples: validation size when there is no sizes.json.
        max_error_rate: fraction of samples that may be skipped as corrupt before the run stops.
        resampled: draw training shards with replacement (no epochs over the corpus; needs an epoch size).
        train_crop_scale: range of the random-resized crop's area share; default (0.08, 1) for images larger
            than 64 px, a milder (0.35, 1) for small images (32 px corpora lose too much with 0.08).
        train_crop_ratio: range of the crop's aspect ratio.
        eval_crop_pct: evaluation center crop as a share of the shorter side (images already at image_size
            are used whole).
        fast_train_decode: training views use libjpeg's fast IDCT and chroma upsampling (13% faster, a few
            grey levels of difference); evaluation views always use the accurate decoder.
        max_image_pixels: an image whose decode would exceed this many pixels (after JPEG DCT scaling) is
            skipped as bad data, so that a decompression bomb cannot exhaust a worker's memory; null: no limit.
        normalization: mean/std preset: imagenet, clip, cifar10 or half.
        mean: per-channel mean overriding the preset.
        std: per-channel std overriding the preset.
        pin_memory: pin batches for faster host-to-GPU copies; default: when CUDA is available.
        persistent_workers: keep dataloader workers alive between epochs.
        prefetch_factor: batches each worker prepares ahead.
        allow_pipe: accept `pipe:` URLs (they run shell commands; off by default).
        remote_retries: reopen attempts of a remote (http(s), s3, gs, ...) shard whose read fails; the shard is
            read on from the sample where it broke, then counted as skipped. The first remote shard is
            opened before training with the same retries.
        remote_backoff: seconds before the first reopen, doubling with every further attempt.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: Optional[str] = None,
        batch_size: int = 64,
        image_size: int = 224,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        train_samples: Optional[int] = None,
        val_samples: Optional[int] = None,
        max_error_rate: float = 0.01,
        resampled: bool = False,
        train_crop_scale: Optional[tuple[float, float]] = None,
        train_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        eval_crop_pct: float = 0.875,
        fast_train_decode: bool = True,
        max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS,
        normalization: str = "imagenet",
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        prefetch_factor: Optional[int] = 2,
        allow_pipe: bool = False,
        remote_retries: int = RETRIES,
        remote_backoff: float = BACKOFF,
        **own: Any,
    ) -> None:
        super().__init__()
        mean_std(normalization)  # fail early on an unknown preset
        shared = {k: v for k, v in locals().items() if k not in ("self", "own", "__class__")}
        # one flat hparams namespace (what checkpoints and `self.hparams.x` see): the shared arguments and the
        # subclass's own, which it passes here as keywords
        self.save_hyperparameters({**shared, **own})
        self._streams: dict[str, ShardStream] = {}
        self._class_names: Optional[list[str]] = None
        self._train_loader: Optional[StreamLoader] = None
        self._train_state: Optional[dict[str, Any]] = None  # from a checkpoint, for the next training loader

    # -- subclasses provide --------------------------------------------------------------------------------
    def _decoder(self, train: bool) -> Any:
        raise NotImplementedError

    def _crop_scale(self) -> tuple[float, float]:
        hp = self.hparams
        return tuple(hp.train_crop_scale or ((0.35, 1.0) if hp.image_size <= 64 else (0.08, 1.0)))

    # -- shared ----------------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[Optional[int], Optional[int]]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return None, None  # ShardStream falls back to torch.distributed, else single process

    def _stream(self, split: str) -> ShardStream:
        if split not in self._streams:
            hp = self.hparams
            train = split == "train"
            rank, world = self._rank_world()
            self._streams[split] = ShardStream(
                self._urls(split),
                self._decoder(train),
                batch_size=hp.batch_size,
                train=train,
                seed=hp.seed,
                shuffle_buffer=hp.shuffle_buffer,
                epoch_samples=hp.train_samples if train else hp.val_samples,
                resampled=hp.resampled and train,
                max_error_rate=hp.max_error_rate,
                rank=rank,
                world_size=world,
                allow_pipe=hp.allow_pipe,
                retries=hp.remote_retries,
                retry_backoff=hp.remote_backoff,
            )
        return self._streams[split]

    def _urls(self, split: str) -> list[str]:
        pattern = self.hparams.train_shards if split == "train" else self.hparams.val_shards
        if not pattern:
            raise ValueError(f"no {split}_shards pattern given; {split} data is needed for this stage")
        urls = expand_urls(pattern, allow_pipe=self.hparams.allow_pipe)
        _warn_if_pattern_names_a_subset(pattern, urls)
        return urls

    def _loader(self, split: str) -> StreamLoader:
        hp = self.hparams
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        return StreamLoader(
            self._stream(split),
            num_workers=hp.num_workers,
            pin_memory=pin,
            persistent_workers=hp.persistent_workers,
            prefetch_factor=hp.prefetch_factor,
            batches_done=self._train_batches_done if split == "train" else None,
            epoch=self._train_epoch if split == "train" else None,
        )

    def _train_epoch(self) -> Optional[int]:
        """The trainer's epoch, which a training pass reads (None outside a trainer). Lightning names the epoch to
        the loader's sampler from its `processed` count, which after resuming an iteration-based fit (max_steps)
        from an epoch-end checkpoint runs one ahead of `current_epoch` for the rest of the run."""
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

    def _train_batches_done(self) -> Optional[int]:
        """The training batches of this epoch that a checkpoint saved now counts as done: the batch counter a fit
        resumed from it starts at (None outside a trainer). A checkpoint saved in `on_train_batch_end` (every
        `every_n_train_steps`, after the optimizer step) holds that batch's update, and Lightning resumes after it;
        anywhere else it resumes after the last batch whose hooks all ran. The loader has usually handed out more:
        DataLoader workers run ahead, and Lightning fetches a batch ahead of the step when the epoch length is
        unknown. With gradient accumulation, a checkpoint between two optimizer steps (only an interruption saves
        one) resumes after the last batch too, as Lightning does, without the partial window's gradients."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return None
        progress = trainer.fit_loop.epoch_loop.batch_progress
        done, total = progress.current.completed, progress.total
        if total.ready == total.started == total.processed == total.completed + 1:
            done += 1  # Lightning's own test for a restart "on train batch end" (_TrainingEpochLoop.update_restart_stage)
        return done

    def setup(self, stage: Optional[str] = None) -> None:
        # fail before training starts, with the pattern in the message, when shards are missing
        if stage in (None, "fit"):
            self._urls("train")
        if stage in (None, "fit", "validate") and self.hparams.val_shards:
            self._urls("val")
        self._streams.clear()  # rank/world may have changed since a previous setup
        self._train_loader = None  # a previous fit's: a checkpoint restored from here on is for the next one

    def train_dataloader(self) -> StreamLoader:
        self._train_loader = self._loader("train")
        if self._train_state is not None:
            self._train_loader.load_state_dict(self._train_state)
            self._train_state = None
        return self._train_loader

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"train_loader": the training loader's position} (plain types), saved in every checkpoint; a collective
        under torch.distributed, as the checkpoint itself is. Empty before a training loader exists."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream where the checkpoint left it (Lightning calls this when it restores one):
        into the training loader if it exists already, else into the one `train_dataloader` makes next."""
        saved = state_dict.get("train_loader")
        if saved is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(saved)
        else:
            self._train_state = saved

    def val_dataloader(self) -> StreamLoader | list:
        # no validation shards: an empty list, which Lightning takes as "skip validation"
        return self._loader("val") if self.hparams.val_shards else []

    def test_dataloader(self) -> StreamLoader | list:
        return self.val_dataloader()

    @property
    def image_size(self) -> int:
        return self.hparams.image_size

    @property
    def class_names(self) -> Optional[list[str]]:
        """Label names from classes.json beside the train (else val) shards, or None when there is none."""
        if self._class_names is None:
            for pattern in (self.hparams.train_shards, self.hparams.val_shards):
                if not pattern:
                    continue
                try:
                    names = read_classes(expand_urls(pattern, allow_pipe=self.hparams.allow_pipe))
                except FileNotFoundError:
                    continue
                if names:
                    self._class_names = names
                    break
        return self._class_names

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes: the num_classes argument where there is one, else the length of classes.json;
        None when neither is known."""
        explicit = self.hparams.get("num_classes")
        if explicit is not None:
            return explicit
        names = self.class_names
        return None if names is None else len(names)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.hparams.mean) if self.hparams.mean is not None else mean_std(self.hparams.normalization)[0]

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.hparams.std) if self.hparams.std is not None else mean_std(self.hparams.normalization)[1]

    def data_stats(self) -> dict[str, float]:
        """Samples read and skipped so far, per split (flat dict, ready for a logger)."""
        out: dict[str, float] = {}
        for split, stream in self._streams.items():
            s = stream.stats.summary()
            out[f"data/{split}_samples_read"] = float(s["samples"])
            out[f"data/{split}_samples_skipped"] = float(s["errors"])
            out[f"data/{split}_skip_rate"] = float(s["error_rate"])
        return out

    def bad_shards(self) -> dict[str, dict[str, int]]:
        """{split: {shard name: samples skipped}} for shards with skipped samples."""
        return {split: stream.stats.summary()["errors_by_shard"] for split, stream in self._streams.items()}


class ImageLabelDataModule(_StreamingDataModule):
    """Image-classification shards (`jpg` + `cls`) for ViT and DeiT; batches (uint8 (B, 3, S, S), int64 (B,)).

    Takes every argument of the shared base (`train_shards`, `batch_size`, `image_size`, ...; see
    `_StreamingDataModule`) and these:

    Args:
        train_shards: training shards: a brace pattern (`dir/train-{000000..000099}.tar`), '::'-separated
            patterns, http(s):// or cloud URLs.
        val_shards: validation shards, same forms.
        num_classes: number of classes; read from classes.json beside the shards when not given.
        synthesize_if_missing: when the train shards match nothing, prepare_data() writes the synthetic
            shapes corpus (demo runs without any download), only ever at its own place, data/shapes/: a
            pattern naming anywhere else is an error, so a typo cannot train on a corpus made up on the spot.
        synth_train_samples: training images of the synthetic corpus (synthesize_if_missing).
        synth_val_samples: validation images of the synthetic corpus.
        synth_shard_size: samples per shard of the synthetic corpus; default: as many shards as the
            train/val patterns name.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str,
        *,
        num_classes: Optional[int] = None,
        synthesize_if_missing: bool = False,
        synth_train_samples: int = 20000,
        synth_val_samples: int = 2000,
        synth_shard_size: Optional[int] = None,
        **kwargs: Any,
    ):
        super().__init__(
            train_shards=train_shards, val_shards=val_shards, num_classes=num_classes,
            synthesize_if_missing=synthesize_if_missing, synth_train_samples=synth_train_samples,
            synth_val_samples=synth_val_samples, synth_shard_size=synth_shard_size, **kwargs,
        )

    def _decoder(self, train: bool) -> ImageLabelDecoder:
        hp = self.hparams
        try:
            num_classes: Optional[int] = self.num_classes  # labels outside [0, num_classes) count as bad data
        except ValueError:
            num_classes = None
        return ImageLabelDecoder(
            hp.image_size, crop_scale=self._crop_scale(), crop_ratio=tuple(hp.train_crop_ratio),
            eval_crop_pct=hp.eval_crop_pct, fast_train_decode=hp.fast_train_decode, num_classes=num_classes,
            max_image_pixels=hp.max_image_pixels,
        )

    def prepare_data(self) -> None:
        hp = self.hparams
        if not hp.synthesize_if_missing:
            return
        try:
            expand_urls(hp.train_shards, allow_pipe=hp.allow_pipe)
            return
        except FileNotFoundError:
            pass
        write_demo_corpus(
            hp.train_shards, hp.val_shards, num_train=hp.synth_train_samples, num_val=hp.synth_val_samples,
            image_size=hp.image_size, seed=hp.seed, shard_size=hp.synth_shard_size,
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (num_classes, else the length of classes.json); ValueError when unknown."""
        n = super().num_classes
        if n is None:
            raise ValueError(
                "number of classes unknown: no classes.json beside the shards; set num_classes "
                "(--data.num_classes N)"
            )
        return n


class ImageTextDataModule(_StreamingDataModule):
    """Image-caption shards (`jpg` + `txt`, as img2dataset or `vitx data from-csv` write) for CLIP.

    Batches: (uint8 images (B, 3, S, S), captions (list of B strings, or int64 (B, L) when a tokenizer is
    given), valid bool (B,) — False only for validation padding under data parallelism). Takes every argument
    of the shared base (`train_shards`, `batch_size`, `image_size`, ...; see `_StreamingDataModule`) and these:

    Args:
        train_shards: training shards: a brace pattern, '::'-separated patterns, http(s):// or cloud URLs.
        val_shards: validation shards, same forms.
        caption: which of a sample's captions (one per line of `txt`) training uses: random (a fresh
            choice every epoch), first, or cycle (caption number epoch % count).
        val_caption: the same choice for validation (first keeps retrieval metrics comparable).
        tokenizer: callable mapping a list of captions to an int64 (B, L) tensor, run in the workers.
        train_crop_scale: range of the random-resized crop's area share (CLIP used a mild crop).
        eval_crop_pct: evaluation center crop as a share of the shorter side.
        normalization: mean/std preset (CLIP's by default): imagenet, clip, cifar10 or half.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: Optional[str] = None,
        *,
        caption: str = "random",
        val_caption: str = "first",
        tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None,
        train_crop_scale: tuple[float, float] = (0.9, 1.0),
        eval_crop_pct: float = 1.0,
        normalization: str = "clip",
        **kwargs: Any,
    ):
        super().__init__(
            train_shards=train_shards, val_shards=val_shards, caption=caption, val_caption=val_caption,
            train_crop_scale=train_crop_scale, eval_crop_pct=eval_crop_pct, normalization=normalization, **kwargs,
        )
        self.tokenizer = tokenizer  # not a hyperparameter: a callable, handed over by the task

    def _decoder(self, train: bool) -> ImageTextDecoder:
        hp = self.hparams
        return ImageTextDecoder(
            hp.image_size, crop_scale=self._crop_scale(), crop_ratio=tuple(hp.train_crop_ratio),
            eval_crop_pct=hp.eval_crop_pct, fast_train_decode=hp.fast_train_decode,
            max_image_pixels=hp.max_image_pixels, caption=hp.caption if train else hp.val_caption,
            tokenizer=self.tokenizer,
        )


class DataStatsLogger(L.Callback):
    """Logs the datamodule's read/skip counts (data/<split>_samples_skipped, ...) every `every_n_steps`
    training steps and at each validation end, so bad data shows up in TensorBoard."""

    def __init__(self, every_n_steps: int = 100):
        self.every_n_steps = every_n_steps

    def _log(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        if isinstance(dm, _StreamingDataModule) and trainer.logger is not None:
            stats = dm.data_stats()
            if stats:
                trainer.logger.log_metrics(stats, step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._log(trainer)
