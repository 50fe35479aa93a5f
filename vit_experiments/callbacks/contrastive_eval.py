"""CLIP's evaluations during training and in `vitx validate` / `vitx test`: zero-shot classification and
image-text retrieval (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", sections 3.1 and 3.1.4, Table 13).

Each callback streams its own shard set through the project's streaming layer (every rank reads its share,
padding included, so every rank runs the same number of batches), embeds it with the module's CLIP model and
its tokenizer, gathers the embeddings of all ranks and logs the metrics of vit_experiments.evaluation:

    <stage>/zeroshot/acc1, <stage>/zeroshot/acc5                 on any classification shard set (jpg + cls)
    <stage>/retrieval/image_to_text/R@k, .../text_to_image/R@k   every caption of every image (jpg + txt)
    <stage>/retrieval/mean_recall                                mean of those numbers

<stage> is val (at the end of validation, every `every_n_epochs` epochs while fitting, always in
`vitx validate`) or test. The towers are called directly through encode_image / encode_text, outside the
strategy's forward: right on one device and under data parallelism (DDP); under the project's FSDP2 sharding
(vit_experiments.scaling) those two methods are registered forward methods, which gather their parameters.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

import lightning as L
import torch

from data_pipelines.constants import IGNORE_INDEX
from data_pipelines.metadata import read_classes
from data_pipelines.samples import ImageLabelDecoder, ImageTextDecoder
from data_pipelines.loader import StreamLoader
from data_pipelines.streaming import ShardStream
from data_pipelines.transforms import normalize
from data_pipelines.urls import expand_urls
from vit_experiments.evaluation import DEFAULT_TEMPLATES, retrieval_recall, topk_accuracy, zeroshot_classifier


class AllCaptionsDecoder(ImageTextDecoder):
    """`jpg` + `txt` -> (image, every caption of the sample); retrieval scores all of them."""

    def decode(self, sample: dict, rng: random.Random, epoch: int, train: bool):
        from data_pipelines.samples import caption_lines  # the training decoder's rule: split at newlines only

        captions = caption_lines(sample["txt"])
        if not captions:
            raise ValueError("empty caption")
        return self.image(sample, rng, train), captions, True

    def pad(self):
        return self.blank(), [], False

    def collate(self, items: list):
        images, _, valid = super().collate([(im, "", v) for im, _, v in items])
        return images, [caps for _, caps, _ in items], valid


def _gather_rows(pl_module: L.LightningModule, x: torch.Tensor) -> list[torch.Tensor]:
    """Each rank's (n_r, ...) rows, n_r may differ -> [rows of rank 0, rows of rank 1, ...] on every rank."""
    world = pl_module.trainer.world_size
    if world == 1:
        return [x]
    counts = pl_module.all_gather(torch.tensor([x.shape[0]], device=x.device)).reshape(world).tolist()
    padded = torch.cat([x, x.new_zeros(max(counts) - x.shape[0], *x.shape[1:])])
    everything = pl_module.all_gather(padded)  # (W, max n_r, ...)
    return [everything[r, : counts[r]] for r in range(world)]


class _ShardEvaluation(L.Callback):
    """When to run, and how to stream a shard set, for the evaluations below."""

    def __init__(self, shards: Optional[str], every_n_epochs: int, batch_size: int, num_workers: int,
                 eval_crop_pct: float):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.shards, self.every_n_epochs = shards, every_n_epochs
        self.batch_size, self.num_workers, self.eval_crop_pct = batch_size, num_workers, eval_crop_pct

    def _urls(self, trainer: L.Trainer) -> list[str]:
        shards = self.shards or getattr(getattr(trainer.datamodule, "hparams", None), "val_shards", None)
        if not shards:
            raise ValueError(f"{type(self).__name__} needs shards: set its `shards`, or give the data val_shards")
        return expand_urls(shards)

    def _loader(self, trainer: L.Trainer, decoder) -> StreamLoader:
        stream = ShardStream(self._urls(trainer), decoder, batch_size=self.batch_size, train=False,
                             rank=trainer.global_rank, world_size=trainer.world_size)
        return StreamLoader(stream, num_workers=self.num_workers, persistent_workers=False)

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        epoch = trainer.current_epoch + 1
        return epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            self._run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module, "test")

    def _images(self, pl_module, images: torch.Tensor) -> torch.Tensor:
        return normalize(images.to(pl_module.device), *pl_module.normalization)

    @torch.no_grad()
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        raise NotImplementedError


class ZeroShotEvaluation(_ShardEvaluation):
    """Zero-shot top-1/top-5 accuracy on a classification shard set.

    Args:
        shards: classification shards (jpg + cls); default: the datamodule's val_shards (the captioned demo
            corpus also carries `cls`).
        class_names: names put into the prompts, in label order; default: classes.json beside the shards,
            underscores read as spaces.
        templates: prompt templates with one "{}" for the class name; default: a general set for photographs.
        every_n_epochs: run at the end of every n-th validation while fitting.
        batch_size: images per batch per device.
        num_workers: dataloader workers (0: read in the main process; the evaluation sets are small).
        eval_crop_pct: center crop as a share of the shorter side (images already at the model's size are
            used whole).
    """

    def __init__(
        self,
        shards: Optional[str] = None,
        class_names: Optional[list[str]] = None,
        templates: Optional[list[str]] = None,
        every_n_epochs: int = 1,
        batch_size: int = 256,
        num_workers: int = 0,
        eval_crop_pct: float = 1.0,
    ):
        super().__init__(shards, every_n_epochs, batch_size, num_workers, eval_crop_pct)
        self.class_names = list(class_names) if class_names else None
        self.templates = list(templates) if templates else list(DEFAULT_TEMPLATES)

    def _class_names(self, urls: Sequence[str]) -> list[str]:
        if self.class_names:
            return self.class_names
        names = read_classes(urls)
        if not names:
            raise ValueError(
                "no class names: give ZeroShotEvaluation class_names, or put classes.json beside the shards"
            )
        return [n.replace("_", " ") for n in names]

    @torch.no_grad()
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        urls = self._urls(trainer)
        names = self._class_names(urls)
        decoder = ImageLabelDecoder(model.cfg.vision.image_size, eval_crop_pct=self.eval_crop_pct,
                                    num_classes=len(names))
        hits = torch.zeros(3, device=pl_module.device)  # top-1 hits, top-5 hits, samples
        with trainer.precision_plugin.forward_context():
            classifier = zeroshot_classifier(lambda p: model.encode_text(pl_module.tokenize(p)), names, self.templates)
            for images, labels in self._loader(trainer, decoder):
                keep = labels != IGNORE_INDEX  # padding that evens out the ranks
                if not keep.any():
                    continue
                labels = labels[keep].to(pl_module.device)
                logits = model.encode_image(self._images(pl_module, images[keep])).float() @ classifier
                acc = topk_accuracy(logits, labels, ks=(1, 5))
                n = float(labels.numel())
                hits += torch.tensor([acc[1] * n, acc[5] * n, n], device=hits.device)
        hits = trainer.strategy.reduce(hits, reduce_op="sum")
        total = max(float(hits[2]), 1.0)
        pl_module.log(f"{stage}/zeroshot/acc1", float(hits[0]) / total)
        pl_module.log(f"{stage}/zeroshot/acc5", float(hits[1]) / total)


class RetrievalEvaluation(_ShardEvaluation):
    """Image -> text and text -> image recall at k over every caption of an image-text shard set.

    Args:
        shards: image-text shards (jpg + txt, one caption per line); default: the datamodule's val_shards.
        ks: the k of R@k.
        every_n_epochs: run at the end of every n-th validation while fitting.
        batch_size: images per batch per device.
        num_workers: dataloader workers (0: read in the main process).
        eval_crop_pct: center crop as a share of the shorter side.
    """

    def __init__(
        self,
        shards: Optional[str] = None,
        ks: tuple[int, ...] = (1, 5, 10),
        every_n_epochs: int = 1,
        batch_size: int = 256,
        num_workers: int = 0,
        eval_crop_pct: float = 1.0,
    ):
        super().__init__(shards, every_n_epochs, batch_size, num_workers, eval_crop_pct)
        self.ks = tuple(ks)

    @torch.no_grad()
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        decoder = AllCaptionsDecoder(model.cfg.vision.image_size, eval_crop_pct=self.eval_crop_pct)
        image_emb, text_emb, owner = [], [], []
        n_images = 0
        with trainer.precision_plugin.forward_context():
            for images, captions, valid in self._loader(trainer, decoder):
                if not valid.any():
                    continue
                image_emb.append(model.encode_image(self._images(pl_module, images[valid])).float())
                kept = [caps for caps, v in zip(captions, valid.tolist()) if v]
                flat = [c for caps in kept for c in caps]
                text_emb.append(model.encode_text(pl_module.tokenize(flat)).float())
                owner += [n_images + i for i, caps in enumerate(kept) for _ in caps]
                n_images += len(kept)
        E = model.cfg.embed_dim
        device = pl_module.device
        image_emb = torch.cat(image_emb) if image_emb else torch.zeros(0, E, device=device)
        text_emb = torch.cat(text_emb) if text_emb else torch.zeros(0, E, device=device)
        owner = torch.tensor(owner, dtype=torch.long, device=device)
        images_by_rank = _gather_rows(pl_module, image_emb)
        texts_by_rank = _gather_rows(pl_module, text_emb)
        owners_by_rank = _gather_rows(pl_module, owner)
        offsets = torch.tensor([0] + [len(x) for x in images_by_rank]).cumsum(0).tolist()
        all_owner = torch.cat([o + offsets[r] for r, o in enumerate(owners_by_rank)])
        all_images, all_texts = torch.cat(images_by_rank), torch.cat(texts_by_rank)
        if len(all_images) == 0:
            raise ValueError("retrieval found no image-text samples in its shards")
        recall = retrieval_recall(all_images, all_texts, all_owner, ks=self.ks)
        for key, value in recall.items():
            pl_module.log(f"{stage}/retrieval/{key}", value)
        pl_module.log(f"{stage}/retrieval/mean_recall", sum(recall.values()) / len(recall))
