"""See inside a Vision Transformer while it trains: the ViT paper's analyses on a fixed probe batch, in TensorBoard.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words": mean attention distance per head against depth
(Fig. 11), position-embedding similarity and how much 2-D topology it has learned (Fig. 9), attention rollout
over the input (Fig. 12; Abnar & Zuidema 2020) and the principal components of the patch-embedding filters
(Fig. 10). The numbers come from vit_experiments.analysis; this callback decides when to run them, on what,
and where the results go.

Probe batch: the first `num_images` validation images, captured once (after the module's batch transfer, so
normalised exactly as the model sees them) and kept in the checkpoint, so that every analysis of a run, resumed
or not, looks at the same images. Without validation data the first training batch is used instead.

Representation set: the first `representation_images` validation images (256; 0 turns it off) with their integer
labels where the batch has them (classification and DeiT: (images, labels); CLIP's (images, token ids) has none),
for linear CKA between layers and, with labels, the per-layer ridge probes (analysis/representations.py: fitted on
one half, scored on the other). Gathered from one validation pass: the sanity check's batches when they fill it,
else the first validation epoch's (whatever it holds by its end); until then the CKA is the probe batch's and there
is no probe. Fixed from then on and kept in the checkpoint, as uint8 when the module can undo its normalisation
(mean/std; exact for uint8 data) and renormalised at each analysis, so that 256 images of 224 px take 38 MB.

Logged (TensorBoard, step = trainer.global_step), every tag under analysis/ (the cost under perf/):
  scalars  analysis/attention_distance{,_min,_max}/layer_XX  pixels: mean, least and most over the heads of layer
                                                            XX (1 = first block)
           analysis/prefix_attention/layer_XX               share of patch queries' attention on class/dist tokens
           analysis/position_embedding/topology_score       corr(cosine similarity, -grid distance), patch pairs
           analysis/probe_cls/layer_XX, probe_patch/layer_XX  ridge-probe test accuracy on the class token and the
                                                            mean patch token (representation set, with labels)
           analysis/cka_adjacent/layer_XX                   CKA of block XX's output with the layer below
           analysis/<name>/layer_XX                         whatever else report.scalars(result) returns
           perf/analysis_seconds, perf/analysis_time_share  this callback's own cost (and its share of the wall
                                                            time since fit start)
  images   analysis/attention_distance   Fig. 11 scatter: heads told apart by colour, marker and offset; the distance
                                         of uniform attention as a dashed line
           analysis/position_similarity  Fig. 9 grid of similarity tiles with axes and a colour bar (-1..1)
           analysis/rollout              each probe image beside its rollout overlay, with the heat map's scale
           analysis/patch_filters        principal components of the patch-embedding filters, with their variance
           analysis/cka, analysis/probe  the CKA heat map between all layers; probe accuracy against depth
           analysis/<name>               any further image of result["images"]
The custom-scalars layout (vit_experiments.loggers) draws each per-layer analysis as one chart of every layer.
Files: <log_dir>/analysis/step_XXXXXX/ with analysis.json, attention_distance.csv and PNG figures.

Cost: one forward pass of `num_images` images with attention maps, the analyses of vit_experiments.analysis.report,
plus drawing. Measured on the demo model (6 layers, width 128, 32-px images, 8 probe images) on a busy shared 2-core
CPU: 2 to 4 s per analysis, figures included (the four ViT-paper figures about 1 s of it); the representation set
adds its forward passes, in eval mode and minibatches of 64, and a few small solves (a real run of
conf/vit/pretrain.yaml: 1.3 to 2.0 s per analysis with the 256-image set, 1.8% of the run). Every run logs its own
cost as perf/analysis_seconds and perf/analysis_time_share, and the run summary (callbacks/dashboard.py) prints the
total. Lower it with a larger every_n_epochs, fewer num_images, log_images=False or save_figures=False
(`vitx fit --analysis.num_images 4 --analysis.every_n_epochs 2`).

Interrupted runs: a fit stopped by Ctrl-C, SIGTERM or an exception gets its final analysis (with `at_end`) of the
newest weights on the way out, when stopping is safe by the rule vit_experiments.callbacks.interruption saves a
checkpoint by: one process, or a stop that every process makes at the same step; never after a second Ctrl-C.

Distributed: the analysis runs on global rank 0 only and calls no collective operation (it uses the unwrapped
model, not the DDP wrapper), so other ranks never wait for a partner that does not come. Sharded strategies
(FSDP, DeepSpeed) need every rank in a forward pass, so the callback switches itself off there with a warning.
Mixed precision: the pure functions compute in float32 whatever the dtype of the attention maps; a bf16-true
model gets its probe cast to bf16.
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Any, Dict, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from data_pipelines.distributed import rank_world
from vit_experiments.callbacks.interruption import COORDINATED

from vit_experiments.analysis import report
from vit_experiments.analysis.plots import figure_to_array
from vit_experiments.analysis.report import FIGURES, analyze_model, save_report
from vit_experiments.callbacks.representation_set import RepresentationSet, display_images

# the labelled figures, as images; result["images"] entries of the same name (the bare pixel tiles) are left out
IMAGE_TAGS = tuple(f"analysis/{name}" for name in FIGURES)
COST_TAGS = ("perf/analysis_seconds", "perf/analysis_time_share")
REPRESENTATION_BATCH = 64  # images per forward pass of the representation set: bounds the activations' memory


def find_backbone(pl_module: L.LightningModule, model_attr: Optional[str] = None) -> torch.nn.Module:
    """The VisionTransformer inside a LightningModule.

    In order: the dotted attribute path `model_attr` ("model.visual" for a CLIP module); the module's
    analysis_backbone() hook; `pl_module.model`; `pl_module.model.visual`.
    """
    if model_attr:
        obj: Any = pl_module
        for part in model_attr.split("."):
            if not hasattr(obj, part):
                raise AttributeError(f"model_attr={model_attr!r}: {type(obj).__name__} has no attribute {part!r}")
            obj = getattr(obj, part)
        candidates = [obj]
    elif callable(getattr(pl_module, "analysis_backbone", None)):
        candidates = [pl_module.analysis_backbone()]
    else:
        model = getattr(pl_module, "model", None)
        candidates = [model, getattr(model, "visual", None)]
    for c in candidates:
        if c is not None and callable(getattr(c, "forward_features", None)):
            return c
    raise TypeError(
        f"cannot find a VisionTransformer in {type(pl_module).__name__}: give "
        f"AttentionAnalysis(model_attr='path.to.vit') or define analysis_backbone() on the module; the model needs "
        f"forward_features(x, return_attention=True)")


def stopped_together(exception: BaseException) -> bool:
    """Whether a fit stopped by `exception` may still do its end-of-run work (InterruptCheckpoint's rule for saving):
    not after a second Ctrl-C (the user wants out now), and in one process or on a stop every process makes at the
    same step (COORDINATED: SIGTERM and a first Ctrl-C, reduced over ranks; a non-finite loss; no progress)."""
    if isinstance(exception, KeyboardInterrupt):
        return False
    return rank_world()[1] == 1 or isinstance(exception, COORDINATED)


class AttentionAnalysis(Callback):
    """Run the ViT analyses on a fixed probe batch during training and log them.

    Args:
        enabled: False turns the callback off (`vitx fit --analysis.enabled false`).
        num_images: size of the probe batch (the first validation images).
        representation_images: size of the labelled representation set for CKA and the linear probes (the first
            validation images, with their labels); 0 turns it off (CKA on the probe batch, no probe).
        every_n_epochs: run at the end of every n-th training epoch (after its validation); 0 or None: never.
        every_n_steps: run every n optimizer steps; 0 or None: never.
        at_start: also run before the first optimizer step (the picture at initialisation).
        at_end: also run when training ends, unless the last run was at that step; also when a fit is stopped by
            Ctrl-C, SIGTERM or an exception, where that is safe (see the module docstring).
        model_attr: dotted path from the LightningModule to the VisionTransformer (e.g. "model.visual");
            by default the module's analysis_backbone(), else `model`, else `model.visual`.
        rollout_token: the prefix token whose attention rollout is drawn (0 class token, 1 DeiT distillation).
        num_components: principal components of the patch-embedding filters to draw.
        log_images: log the figures as TensorBoard images (scalars are always logged).
        save_figures: also write PNG figures beside analysis.json / attention_distance.csv.
        dirname: folder under the run's log directory.
        raise_errors: let an exception in the analysis stop training. By default it is reported as a warning and
            the callback switches itself off, so that a plotting problem never ends a long run (or hangs DDP).
    """

    def __init__(
        self,
        enabled: bool = True,
        num_images: int = 8,
        representation_images: int = 256,
        every_n_epochs: Optional[int] = 1,
        every_n_steps: Optional[int] = None,
        at_start: bool = True,
        at_end: bool = True,
        model_attr: Optional[str] = None,
        rollout_token: int = 0,
        num_components: int = 28,
        log_images: bool = True,
        save_figures: bool = True,
        dirname: str = "analysis",
        raise_errors: bool = False,
    ) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if representation_images < 0:
            raise ValueError(f"representation_images must be >= 0 (0: off), got {representation_images}")
        for name, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 1, or 0/None to turn it off; got {v}")
        self.enabled = enabled
        self.num_images = num_images
        self.representation_images = representation_images
        self.every_n_epochs = every_n_epochs or 0
        self.every_n_steps = every_n_steps or 0
        self.at_start, self.at_end = at_start, at_end
        self.model_attr = model_attr
        self.rollout_token = rollout_token
        self.num_components = num_components
        self.log_images, self.save_figures = log_images, save_figures
        self.dirname = dirname
        self.raise_errors = raise_errors

        self._probe: Optional[torch.Tensor] = None  # (N, C, H, W) float, normalised, on the CPU; fixed once set
        self._display: Optional[torch.Tensor] = None  # (N, C, H, W) uint8 for drawing, when the module can denormalise
        self._collected: list = []  # validation images gathered until there are num_images
        self._fallback: Optional[torch.Tensor] = None  # first training batch, used when there is no validation data
        self._rep = RepresentationSet(representation_images)  # for CKA and the probes
        self._disabled: Optional[str] = None if enabled else "enabled=False"
        self._out_root: Optional[str] = None
        self._last_step = -1
        self._seconds = 0.0  # analysis time since fit start
        self._fit_t0: Optional[float] = None
        self.runs = 0  # analyses done by this process
        self.seconds_total = 0.0  # their cost in seconds, for the run summary

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy or "ModelParallel" in strategy:
            self._disabled = f"{strategy} shards the weights, so one rank cannot run the model alone"
            rank_zero_warn(f"AttentionAnalysis is off: {self._disabled}")
        # trainer.log_dir broadcasts from rank 0: ask for it here, where every rank calls it, never on rank 0 alone
        self._out_root = os.path.join(trainer.log_dir or trainer.default_root_dir, self.dirname)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_t0 = time.perf_counter()
        self._seconds = 0.0

    def state_dict(self) -> Dict[str, Any]:
        # the probe travels with the checkpoint, so a resumed run analyses the same images
        return {"probe": self._probe, "display": self._display, **self._rep.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict.get("probe") is not None:
            self._probe = state_dict["probe"]
            self._display = state_dict.get("display")
        self._rep.load_state_dict(state_dict)

    # -- probe batch ----------------------------------------------------------------------------------------------
    def _take(self, batch: Any, n: int) -> Optional[torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            return None  # not an image batch the model takes as is
        return images[:n].detach().float().cpu().clone()

    def _collected_probe(self) -> Optional[torch.Tensor]:
        return torch.cat(self._collected)[: self.num_images] if self._collected else None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._disabled or not trainer.is_global_zero or dataloader_idx != 0:
            return
        self._rep.gather(pl_module, batch)
        if self._probe is not None:
            return
        have = sum(len(x) for x in self._collected)
        if have < self.num_images:
            images = self._take(batch, self.num_images - have)
            if images is not None:
                self._collected.append(images)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._rep.restart()  # each pass starts at the first batch again: a sanity check's partial set would repeat

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not trainer.is_global_zero or self._disabled:
            return
        if self._probe is None and self._fallback is None:
            self._fallback = self._take(batch, self.num_images)
        if self.at_start and trainer.global_step == 0:
            self._maybe_run(trainer, pl_module)

    def _freeze_probe(self, pl_module: L.LightningModule) -> Optional[torch.Tensor]:
        if self._probe is None:
            self._probe = self._collected_probe()
            if self._probe is None and self._fallback is not None:
                rank_zero_warn("AttentionAnalysis: no validation batch seen; the probe is the first training batch")
                self._probe = self._fallback
            if self._probe is not None:
                self._display = display_images(pl_module, self._probe)
            self._collected, self._fallback = [], None
        return self._probe

    # -- when ---------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._maybe_run(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._maybe_run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self._maybe_run(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not self.at_end or trainer.state.fn != TrainerFn.FITTING or not stopped_together(exception):
            return
        try:
            self._maybe_run(trainer, pl_module)
        except Exception:  # raise_errors: still never in place of the error that stopped the run
            rank_zero_warn(f"AttentionAnalysis: the final analysis failed:\n{traceback.format_exc()}")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.is_global_zero:
            self._rep.freeze()  # the first validation epoch's images, however many it had
        if trainer.state.fn == "validate":  # `vitx validate`: one analysis of the checkpoint
            self._maybe_run(trainer, pl_module)

    # -- what ---------------------------------------------------------------------------------------------------
    def _maybe_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # rank 0 only, and nothing below may call a collective: other ranks carry on to their next step
        if self._disabled or not trainer.is_global_zero or trainer.sanity_checking:
            return
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if self._freeze_probe(pl_module) is None:
            rank_zero_warn("AttentionAnalysis: no image batch seen yet; skipping this analysis")
            return
        try:
            self._run(trainer, pl_module, step)
        except Exception as err:
            if self.raise_errors:
                raise
            self._disabled = f"{type(err).__name__}: {err}"
            rank_zero_warn(f"AttentionAnalysis failed at step {step} and is off for the rest of the run:\n"
                           f"{traceback.format_exc()}")

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Dict[str, Any]:
        t0 = time.perf_counter()
        backbone = find_backbone(pl_module, self.model_attr)
        # drawn once, for TensorBoard and the PNG files alike
        figures = self.log_images or self.save_figures
        rep, labels, classes = self._rep.prepared(pl_module)
        result = analyze_model(backbone, self._probe, self._display, num_components=self.num_components,
                               rollout_token=self.rollout_token, figures=figures, representation_images=rep,
                               representation_labels=labels, num_classes=classes,
                               representation_batch_size=REPRESENTATION_BATCH)
        scalars = self.scalars(result)
        images = {}
        if self.log_images:
            for name, fig in result["figures"].items():
                images[f"analysis/{name}"] = figure_to_array(fig)
            for name, img in result["images"].items():
                images.setdefault(f"analysis/{name}", img)  # a labelled figure of that name replaces the tiles
        out_dir = os.path.join(self._out_root or self.dirname, f"step_{step:06d}")
        extra = {"step": step, "epoch": trainer.current_epoch, "global_rank": trainer.global_rank}
        save_report(result, out_dir, extra=extra, figures=self.save_figures)

        seconds = time.perf_counter() - t0
        self._seconds += seconds
        scalars["perf/analysis_seconds"] = seconds
        if self._fit_t0 is not None:
            scalars["perf/analysis_time_share"] = self._seconds / max(time.perf_counter() - self._fit_t0, 1e-9)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            writer = logger.experiment
            if images and callable(getattr(writer, "add_image", None)):  # TensorBoard's SummaryWriter
                for tag, img in images.items():
                    writer.add_image(tag, img, step, dataformats="HWC")
        self.runs += 1
        self.seconds_total = self._seconds
        return result

    @staticmethod
    def scalars(result: Dict[str, Any]) -> Dict[str, float]:
        """The scalars of one analysis, all under analysis/: report.scalars(result) where the analysis module has
        it (every analysis it computes), else the ViT paper's numbers."""
        if callable(getattr(report, "scalars", None)):
            out = dict(report.scalars(result))
        else:
            out = {}
            for i in range(result["num_layers"]):
                layer = f"layer_{i + 1:02d}"
                out[f"analysis/attention_distance/{layer}"] = float(result["distance_mean"][i])
                out[f"analysis/attention_distance_min/{layer}"] = float(result["distance_min"][i])
                out[f"analysis/attention_distance_max/{layer}"] = float(result["distance_max"][i])
                out[f"analysis/prefix_attention/{layer}"] = float(np.mean(result["prefix_attention"][i]))
            if result.get("topology_score") is not None:
                out["analysis/position_embedding/topology_score"] = float(result["topology_score"])
        return {k: float(v) for k, v in out.items() if np.isfinite(v)}
