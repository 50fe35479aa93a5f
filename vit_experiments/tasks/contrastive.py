"""Contrastive image-text pretraining: CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision").

Batches arrive as (uint8 images (B, 3, H, W), captions, valid (B,)) from data_pipelines' ImageTextDataModule;
captions are token ids (B, L) when the data workers tokenise (the task hands its tokenizer to the datamodule)
or strings, which are tokenised here. Images are normalised here, on the accelerator; no flips, which would
contradict captions that say "left" and "right".

The loss scores each device's rows against the batch gathered from every device (vit_experiments.losses), so
training on W devices computes the single-device loss and gradients of the global batch. The temperature is
clamped after every optimizer step. Zero-shot classification and retrieval run in callbacks
(vit_experiments.callbacks.contrastive_eval).

Gradient accumulation keeps the whole contrastive batch. With `trainer.accumulate_grad_batches` k > 1
(conf/trainer/grad_accum.yaml) the task accumulates by feature caching (vit_experiments.tasks.feature_cache,
GradCache): the k micro-batches are embedded without gradients, the loss is computed over all k B pairs per device
at the last one, and each micro-batch is re-run with gradients against the cached embeddings; loss and gradients
are those of one step on k B pairs per device. Lightning's own accumulation would sum k separate B-pair losses.
To do this the task switches itself to manual optimisation in `setup("fit")`. Lightning refuses
accumulate_grad_batches > 1 together with manual optimisation (its loop would not accumulate for the module);
the check runs before `setup`, while the task is still automatic, so it passes, and the trainer keeps k: Lightning
then counts what it counts under plain accumulation (optimizer steps for max_steps, the learning-rate schedule's
length through `estimated_stepping_batches`, the logging step). The task steps the optimizer and the schedule,
clips gradients as `trainer.gradient_clip_val` says (after the fp16 loss scaler's unscale), clamps the
temperature, and blocks the gradient reduction (DDP no_sync, FSDP2 set_requires_gradient_sync) on all but the
last micro-batch. The size of the contrastive batch is printed at fit start and logged as
`train/contrastive_batch`.

The tokenizer (data_pipelines.tokenizer, a JSON file) belongs to the model: its ids index the token
embedding. It is copied into the run directory and stored in every checkpoint, from which it is restored.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional

import torch
from torchmetrics import MeanMetric

from data_pipelines.tokenizer import CaptionTokenizer
from data_pipelines.transforms import CLIP_MEAN, CLIP_STD, normalize
from vit_experiments.checkpoints import METADATA_KEY, config_from_dict
from vit_experiments.losses import contrastive_loss
from vit_experiments.models.clip import CLIP, CLIPConfig
from vit_experiments.models.vit import VisionTransformer
from vit_experiments.tasks.core import VisionTask
from vit_experiments.tasks.feature_cache import FeatureCache
from vit_experiments.tasks.optim import OptimConfig


class ContrastivePretraining(VisionTask):
    """CLIP trained with the symmetric contrastive loss, AdamW and warm-up + cosine.

    Args:
        clip: the architecture: image tower (a ViT), text tower, embedding width, temperature and its ceiling.
        tokenizer: the caption tokenizer JSON (`vitx data train-tokenizer SHARDS OUT`). Not needed when
            resuming or evaluating a checkpoint, which carries its own.
        optim: learning rate, weight decay and schedule (CLIP: AdamW, beta2 0.98, weight decay 0.2).
        mean: per-channel mean of [0, 1] pixels; by default a checkpoint's, else the data module's preset, else
            CLIP's. Saved in every checkpoint.
        std: per-channel standard deviation, likewise.
        init_from: a CLIP checkpoint to start from (the image tower's position embedding resampled).
        local_loss: under data parallelism each device scores only its own rows against the gathered columns
            (open_clip's local_loss; equal loss and gradients, 2/W of the logits' memory); False builds the whole
            global logit matrix on every device.
    """

    default_normalization = (CLIP_MEAN, CLIP_STD)

    def __init__(
        self,
        clip: CLIPConfig = CLIPConfig(),
        tokenizer: Optional[str] = None,
        optim: OptimConfig = OptimConfig(lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), warmup_steps=2000),
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        init_from: Optional[str] = None,
        local_loss: bool = True,
    ) -> None:
        super().__init__(optim, mean, std)
        clip = config_from_dict("clip", clip) if isinstance(clip, dict) else clip
        self.save_task_hyperparameters(clip=clip, tokenizer=tokenizer, optim=self.optim_cfg, mean=mean, std=std,
                                       init_from=init_from, local_loss=local_loss)
        self.local_loss = local_loss
        self.tokenizer_path = tokenizer
        self.model = CLIP(clip)
        self.init_weights_from(init_from)
        self.tokenizer: Optional[CaptionTokenizer] = None
        self.val_loss = MeanMetric()
        self.accumulate = 1  # micro-batches per optimizer step: trainer.accumulate_grad_batches, read at fit setup
        self.feature_cache: Optional[FeatureCache] = None  # set when accumulating (then optimisation is manual)

    # -- hooks other code relies on ---------------------------------------------------------------------
    def image_size(self) -> int:
        return self.model.cfg.vision.image_size

    def num_classes(self) -> None:
        return None  # zero-shot classifies with any label set

    def analysis_backbone(self) -> VisionTransformer:
        """The image tower, for the attention and position-embedding analyses."""
        return self.model.visual

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        return self.model(images, ids)  # (B, E), (B, E), ()
    # -- the tokenizer --------------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: CaptionTokenizer) -> None:
        """Use `tokenizer` (checked against the text tower) here and in the datamodule's workers."""
        text = self.model.cfg.text
        if tokenizer.vocab_size > text.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the text tower embeds {text.vocab_size}: "
                f"set --model.clip.text.vocab_size {tokenizer.vocab_size} (or more)"
            )
        if tokenizer.context_length > text.context_length:
            raise ValueError(
                f"the tokenizer makes sequences of {tokenizer.context_length} tokens but the text tower holds "
                f"{text.context_length}: set --model.clip.text.context_length {tokenizer.context_length}"
            )
        if tokenizer.eot_id != text.eot_token_id:
            raise ValueError(f"the tokenizer's end token is {tokenizer.eot_id}; set --model.clip.text.eot_token_id "
                             f"{tokenizer.eot_id}")
        self.tokenizer = tokenizer
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "tokenizer"):
            if dm.tokenizer is None or isinstance(dm.tokenizer, CaptionTokenizer):
                dm.tokenizer = tokenizer  # tokenise in the data workers

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer yet: give --model.tokenizer PATH (made by `vitx data train-tokenizer`)")
        return self.tokenizer(texts).to(self.device)

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        restoring = self.restored_for is not None  # a checkpoint being restored brings its own tokenizer
        if self.tokenizer is None and self.tokenizer_path and not (restoring and not os.path.isfile(self.tokenizer_path)):
            if not os.path.isfile(self.tokenizer_path):
                raise FileNotFoundError(
                    f"no caption tokenizer at {self.tokenizer_path}; train one on the training captions with "
                    f"`vitx data train-tokenizer '<train shards>' {self.tokenizer_path}`")
            self.set_tokenizer(CaptionTokenizer.load(self.tokenizer_path, self.model.cfg.text.context_length))
        elif self.tokenizer is not None:
            self.set_tokenizer(self.tokenizer)  # hand it to this trainer's datamodule
        # without either, captions must arrive as token ids, or a checkpoint brings its tokenizer
        # (on_load_checkpoint); tokenize() says what to do otherwise
        super().setup(stage)
        if stage == "fit":
            self.configure_accumulation(int(self.trainer.accumulate_grad_batches))

    def configure_accumulation(self, k: int) -> None:
        """k micro-batches per optimizer step: k > 1 accumulates by feature caching, under manual optimisation
        (the module docstring says why the trainer keeps accumulate_grad_batches = k)."""
        if k < 1:
            raise ValueError(f"accumulate_grad_batches must be at least 1, got {k}")
        self.accumulate = k
        self.automatic_optimization = k == 1
        self.feature_cache = FeatureCache() if k > 1 else None

    def teardown(self, stage: str) -> None:
        if stage == "fit":  # a later fit of this module starts automatic, as Lightning's configuration check expects
            self.configure_accumulation(1)
        super().teardown(stage)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # the tokenizer beside the run: the run directory alone is enough to use the model
        log_dir = self.trainer.log_dir
        # without a logger, log_dir is the working directory: the tokenizer is still saved in checkpoints
        if self.trainer.is_global_zero and self.trainer.logger is not None and log_dir and self.tokenizer is not None:
            self.tokenizer.save(os.path.join(log_dir, "tokenizer.json"))
        self.print(self.contrastive_batch_message())

    def contrastive_batch_message(self) -> str:
        """One line: how many pairs one optimizer step scores against each other, and how they are made up."""
        dm = getattr(self.trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None) or (getattr(dm, "hparams", None) or {}).get("batch_size")
        world, k = self.trainer.world_size, self.accumulate
        parts = [f"{per_device or 'data.batch_size'} per device", f"{world} device{'s' * (world > 1)}"]
        if k > 1:
            parts.append(f"{k} accumulated micro-batches")
        total = f"{per_device * world * k} pairs" if per_device else "the pairs"
        line = f"contrastive batch: {total} per optimizer step ({' x '.join(parts)})"
        if k > 1:
            line += (f"; feature-cached accumulation: every image is scored against every caption of the {k} "
                     f"micro-batches")
        return line

    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()
        meta["tokenizer"] = self.tokenizer.to_str() if self.tokenizer is not None else None
        return meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        carry_step_count(checkpoint.get("loops", {}).get("fit_loop"), manual=not self.automatic_optimization)
        tokenizer = (checkpoint.get(METADATA_KEY) or {}).get("tokenizer")
        if tokenizer:  # the model's own tokenizer wins over any file named in the config
            self.set_tokenizer(CaptionTokenizer.from_str(tokenizer))

    # -- data on the accelerator ----------------------------------------------------------------------------
    def prepare_batch(self, batch, training: bool):
        """Normalised images, token ids, and the valid mask of evaluation padding. No flips: captions say
        "left" and "right"."""
        images, texts = batch[0], batch[1]
        valid = batch[2] if len(batch) > 2 else torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        images = normalize(images, *self.normalization)  # uint8 -> float32, on the accelerator
        ids = texts if isinstance(texts, torch.Tensor) else self.tokenize(list(texts))  # (B, L)
        return images, ids, valid

    # -- steps ------------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Optional[torch.Tensor]:
        if self.feature_cache is not None:
            return self.accumulating_step(batch, batch_idx)
        images, ids, _ = batch  # training batches hold no padding
        image_emb, text_emb, logit_scale = self.model(images, ids)  # (B, E), (B, E), ()
        loss = contrastive_loss(image_emb, text_emb, logit_scale, local=self.local_loss)
        self.log_step(loss, logit_scale, images.shape[0] * self.trainer.world_size)
        return loss

    def log_step(self, loss: torch.Tensor, logit_scale: torch.Tensor, pairs: int) -> None:
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # mean over devices = the global batch's loss
        self.log("train/logit_scale", logit_scale.detach().exp(), prog_bar=True)  # 1 / temperature
        self.log("train/contrastive_batch", float(pairs))  # pairs scored against each other in this step

    # -- feature-cached gradient accumulation ---------------------------------------------------------------
    def accumulating_step(self, batch, batch_idx: int) -> Optional[torch.Tensor]:
        """Cache this micro-batch's embeddings; at the last micro-batch of the step, the loss over all of them,
        one backward per micro-batch, the optimizer and schedule step (vit_experiments.tasks.feature_cache)."""
        images, ids, _ = batch
        cache = self.feature_cache
        cache.cache(self.model, images, ids)
        if not self.step_ends(batch_idx):
            return None
        logit_scale = self.model.logit_scale.detach().clone()  # () the value this step's loss uses
        loss, grads, scale_grad = cache.loss_and_gradients(self.model.logit_scale, self.local_loss)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        last = len(cache) - 1
        for j in range(len(cache)):  # gradients reduced over devices once, in the last backward
            with nullcontext() if j == last else self.no_gradient_sync():
                self.manual_backward(cache.replay(self.model, j, grads[j], scale_grad if j == last else None))
        optimizer.step()  # through the precision plugin: the fp16 scaler unscales, skips overflows; clipping in
        # on_before_optimizer_step
        for config in self.trainer.lr_scheduler_configs:  # as Lightning would: per-step schedulers every
            # `frequency` optimizer steps (vitx's warm-up + cosine is one); per-epoch ones are Lightning's to step
            if config.interval == "step" and self.trainer.global_step % config.frequency == 0:  # counts this step
                config.scheduler.step()
        self.after_optimizer_step()
        pairs = cache.pairs() * self.trainer.world_size
        cache.clear()
        self.log_step(loss, logit_scale, pairs)
        return loss

    def step_ends(self, batch_idx: int) -> bool:
        """Whether the optimizer steps after this batch: every `accumulate` batches of the epoch and at its last
        batch, where Lightning's plain accumulation steps (a run resumed between two steps completes the window
        it resumed in, with the micro-batches it has)."""
        if (batch_idx + 1) % self.accumulate == 0 or batch_idx + 1 >= self.trainer.num_training_batches:
            return True
        return bool(self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    @contextmanager
    def no_gradient_sync(self) -> Iterator[None]:
        """Gradients accumulate on each device without being reduced: DDP's no_sync, FSDP2's
        set_requires_gradient_sync(False); nothing to block on one device."""
        fsdp2 = [m for m in self.sharded_modules() if hasattr(m, "set_requires_gradient_sync")]
        wrapper = getattr(self.trainer.strategy, "model", None)
        for m in fsdp2:
            m.set_requires_gradient_sync(False)
        try:
            with wrapper.no_sync() if hasattr(wrapper, "no_sync") else nullcontext():
                yield
        finally:
            for m in fsdp2:
                m.set_requires_gradient_sync(True)

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.automatic_optimization:  # Lightning clips only under automatic optimisation; here, after the
            self.clip_gradients(optimizer)  # fp16 unscale, as trainer.gradient_clip_val/_algorithm say

    def evaluate(self, batch, stage: str) -> None:
        images, ids, valid = batch
        image_emb, text_emb, logit_scale = self.model(images, ids)
        n = int(valid.sum())
        if n > 0:  # per-device batches scored among themselves: padding differs between devices
            loss = contrastive_loss(image_emb[valid], text_emb[valid], logit_scale, gather=False)
            self.val_loss.update(loss, weight=n)
        self.log(f"{stage}/loss", self.val_loss, prog_bar=True)

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        images, ids, valid = batch
        return {"image_embeddings": self.model.encode_image(images)[valid],
                "text_embeddings": self.model.encode_text(ids)[valid]}

    def after_optimizer_step(self) -> None:
        # on every device (also on each device's shard under FSDP): t <= ln 100
        self.model.clamp_logit_scale()


def carry_step_count(fit_loop: Optional[dict], manual: bool) -> None:
    """Lightning counts optimizer steps in one of two places, by whether the module optimises itself (manual) or not.
    A checkpoint of a run with feature-cached accumulation resumed without it, or the reverse, would restart the
    step count (max_steps, the logging step) at 0: the count is copied to the place this run reads, in place."""
    if not fit_loop:
        return
    automatic = (fit_loop.get("epoch_loop.automatic_optimization.optim_progress") or {}).get("optimizer", {}).get("step")
    own = fit_loop.get("epoch_loop.manual_optimization.optim_step_progress")
    if automatic is None or own is None:
        return
    src, dst = (automatic, own) if manual else (own, automatic)
    if dst["total"]["completed"] == 0 and src["total"]["completed"] > 0:
        for part in ("total", "current"):
            dst[part].update({k: src[part][k] for k in ("ready", "completed")})
