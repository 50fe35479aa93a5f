"""What a run tells TensorBoard and the terminal about itself: its hyperparameters against its headline metrics, its
resolved config, and a summary at the end.

- HParams tab: the experiment's real hyperparameters (model and its size, learning rate, batch size per device,
  devices x nodes x accumulation = global batch, precision, strategy, steps, seed) as one session per run, in that
  order (the table shows the first five until more are ticked: model, params_M, lr, global_batch, precision), with
  the run's headline metrics as the metric columns: every `val/` scalar (loss, acc1, acc5; for CLIP the zero-shot
  accuracies and retrieval recalls) and `train/loss`. TensorBoard reads the metric values from the run's own
  scalars, so runs compare there by `val/acc1`. Lightning's own dump of the task's arguments (every field of
  every config, `_instantiator` and all) and its `hp_metric` are turned off.
- Text tab: `run/config`, the resolved config.yaml of the run (what `vitx fit --config` would repeat), and
  `run/summary`, written when training ends: the best monitored metric and its checkpoint, the last checkpoint,
  images, steps, wall time and images per second, the forward FLOPs of one image, and what the attention
  analysis cost.
- Terminal: the same summary, printed when training ends.

Everything is written by global rank 0 only and calls no collective.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

# the fields of a network's config that say its size, in the order the HParams table shows them
VIT_FIELDS = ("variant", "image_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "drop_path_rate")
TEXT_FIELDS = ("context_length", "vocab_size", "width", "depth", "num_heads")
LEFT_OUT = {"mean", "std", "tokenizer"}  # task arguments that are no hyperparameter to compare runs by


def _plain(value: Any) -> Any:
    """A value TensorBoard's hparams plugin takes (number, string, bool), or None to leave it out."""
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return None


def _pick(prefix: str, config: Any, fields) -> Dict[str, Any]:
    out = {}
    if isinstance(config, Mapping):
        for f in fields:
            v = _plain(config.get(f))
            if v is not None:
                out[f"{prefix}{f}"] = v
    return out


def experiment_hparams(trainer: L.Trainer, pl_module: L.LightningModule) -> Dict[str, Any]:
    """The hyperparameters of a run, headline first: {name: number | str | bool}."""
    hp = dict(pl_module.hparams_initial)
    dm = trainer.datamodule
    data = dict(dm.hparams_initial) if dm is not None and hasattr(dm, "hparams_initial") else {}
    optim = hp.get("optim") if isinstance(hp.get("optim"), Mapping) else {}
    batch = data.get("batch_size")
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    # the first five are the columns the HParams table shows until more are ticked
    out: Dict[str, Any] = {"model": model_name(hp)}
    trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    out["params_M"] = round(trainable / 1e6, 3)
    out.update(_pick("", optim, ("lr",)))
    if isinstance(batch, int):
        out["global_batch"] = batch * int(trainer.world_size) * accumulate
    out["precision"] = str(trainer.precision)
    out["task"] = type(pl_module).__name__
    if isinstance(batch, int):
        out["batch_size"] = batch
    out["devices"] = int(trainer.num_devices)
    out["num_nodes"] = int(trainer.num_nodes)
    out["accumulate_grad_batches"] = accumulate
    out["strategy"] = type(trainer.strategy).__name__
    out.update(_pick("", optim, ("weight_decay", "warmup_steps", "min_lr_ratio", "layer_decay")))
    out["max_epochs"] = trainer.max_epochs if trainer.max_epochs is not None else -1
    out["max_steps"] = int(trainer.max_steps)
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        out["seed"] = int(seed)
    if isinstance(hp.get("vit"), Mapping):
        out.update(_pick("vit.", hp["vit"], VIT_FIELDS))
    if isinstance(hp.get("resnet"), Mapping):
        out.update(_pick("resnet.", hp["resnet"], ("depth", "image_size")))
    clip = hp.get("clip")
    if isinstance(clip, Mapping):
        out.update(_pick("clip.", clip, ("embed_dim",)))
        out.update(_pick("clip.vision.", clip.get("vision"), VIT_FIELDS))
        out.update(_pick("clip.text.", clip.get("text"), TEXT_FIELDS))
    for key, value in hp.items():  # the task's own scalar arguments: label smoothing, distillation, ...
        if key.startswith("_") or key in LEFT_OUT or isinstance(value, Mapping):
            continue
        v = _plain(value)
        if v is not None:
            out[key] = v
    if isinstance(data.get("image_size"), int) and not any(k.endswith("image_size") for k in out):
        out["data.image_size"] = data["image_size"]
    return out


def model_name(hp: Mapping[str, Any]) -> str:
    """One readable column for the network: "ViT 6x128 h4 p4 32px", "ResNet-18 32px", "CLIP ViT 4x128 h4 p8 32px +
    text 2x128"; a named variant is given as such ("ViT-S/16 224px")."""
    def vit(cfg: Any) -> str:
        if not isinstance(cfg, Mapping):
            return "ViT"
        size = f" {cfg.get('image_size')}px" if cfg.get("image_size") else ""
        if cfg.get("variant"):
            return f"ViT-{cfg['variant']}{size}"
        return (f"ViT {cfg.get('depth')}x{cfg.get('embed_dim')} h{cfg.get('num_heads')} p{cfg.get('patch_size')}"
                + size)

    if isinstance(hp.get("vit"), Mapping):
        return vit(hp["vit"])
    if isinstance(hp.get("resnet"), Mapping):
        r = hp["resnet"]
        return f"ResNet-{r.get('depth')}" + (f" {r.get('image_size')}px" if r.get("image_size") else "")
    clip = hp.get("clip")
    if isinstance(clip, Mapping):
        text = clip.get("text") if isinstance(clip.get("text"), Mapping) else {}
        return f"CLIP {vit(clip.get('vision'))} + text {text.get('depth')}x{text.get('width')}"
    return "?"


def hparams_summaries(hparams: Mapping[str, Any], metrics: List[str]) -> tuple:
    """TensorBoard's (experiment, session start, session end) summaries of one run. TensorBoard orders the columns
    by name, so each name carries its place ("00.model") and the column shows the plain name (display_name)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard.summary import hparams as tb_hparams

    placed = {f"{i:02d}.{key}": value for i, (key, value) in enumerate(hparams.items())}
    exp, ssi, sei = tb_hparams(placed, {m: 0.0 for m in metrics})
    value = exp.value[0]
    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.display_name = info.name.split(".", 1)[1]
    value.metadata.plugin_data.content = data.SerializeToString()
    return exp, ssi, sei


def headline_metrics(tags) -> List[str]:
    """The metric columns of the HParams tab: every val/ scalar, then train/loss."""
    names = sorted(t for t in tags if t.startswith("val/"))
    return names + [t for t in ("train/loss",) if t in tags]


def _tensorboard_writers(trainer: L.Trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if callable(getattr(lg.experiment, "add_text", None))]


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown: keep the YAML's indentation


class Dashboard(Callback):
    """HParams, the resolved config and the run summary in TensorBoard, and the summary in the terminal (see the
    module docstring). `vitx fit` adds it to every run."""

    def __init__(self) -> None:
        self.hparams: Dict[str, Any] = {}
        self.metrics: List[str] = []
        self.summary: Optional[str] = None
        self.log_dir = ""
        self._hparams_written = False
        self._t0: Optional[float] = None
        self._images = 0

    # -- setup: Lightning's hyperparameter dump off ------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts from rank 0: asked here, where every rank calls it, never on rank 0 alone
        self.log_dir = trainer.log_dir or trainer.default_root_dir
        pl_module._log_hyperparams = False  # replaced by experiment_hparams, with metrics
        if trainer.datamodule is not None:
            trainer.datamodule._log_hyperparams = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._images, self._hparams_written = time.perf_counter(), 0, False
        if not trainer.is_global_zero:
            return
        self.hparams = experiment_hparams(trainer, pl_module)
        path = os.path.join(self.log_dir, "config.yaml")
        if os.path.isfile(path):  # written by LightningCLI's SaveConfigCallback at setup
            with open(path) as f:
                text = f.read()
            for writer in _tensorboard_writers(trainer):
                writer.add_text("run/config", _code_block(text), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += len(images) if hasattr(images, "__len__") else 0

    # -- hparams, once the metric names are known ----------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._write_hparams(trainer)

    def _write_hparams(self, trainer: L.Trainer) -> None:
        if self._hparams_written or not trainer.is_global_zero or not self.hparams:
            return
        self._hparams_written = True
        tags = set(trainer.callback_metrics)
        for lg in trainer.loggers:
            written = getattr(lg, "scalar_tags", None)  # vit_experiments.loggers.TensorBoardLogger's
            if isinstance(written, set):
                tags |= written
        self.metrics = headline_metrics(tags)
        for lg in trainer.loggers:
            get_writer = getattr(lg.experiment, "_get_file_writer", None)
            file_writer = get_writer() if callable(get_writer) else None  # None from fast_dev_run's DummyLogger
            if callable(getattr(file_writer, "add_summary", None)):
                # TensorBoard: a session whose metric values TensorBoard reads from the run's scalars
                for summary in hparams_summaries(self.hparams, self.metrics):
                    file_writer.add_summary(summary)
            elif not callable(get_writer):
                lg.log_hyperparams(self.hparams)

    # -- the end ------------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._write_hparams(trainer)
        self.summary = run_summary(trainer, self.log_dir, self._images * max(1, trainer.world_size),
                                   time.perf_counter() - (self._t0 or time.perf_counter()))
        for writer in _tensorboard_writers(trainer):
            first, *rest = self.summary.splitlines()
            writer.add_text("run/summary", "\n".join([f"**{first}**", ""] + [f"- {line}" for line in rest]),
                            trainer.global_step)
            writer.flush()
        rank_zero_info("\n" + self.summary)


def _best(trainer: L.Trainer) -> Optional[ModelCheckpoint]:
    monitored = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    return monitored[0] if monitored else None


def _epochs(trainer: L.Trainer) -> str:
    """How far through the data the run got: "7.56 epochs" (a run stopped by max_steps or the time guard ends
    inside an epoch, which Lightning's current_epoch counts as done)."""
    batches = trainer.num_training_batches
    per_epoch = batches / max(int(trainer.accumulate_grad_batches), 1) if isinstance(batches, (int, float)) else 0
    if per_epoch and math.isfinite(per_epoch):
        return f"{trainer.global_step / per_epoch:.2f} epochs"
    return f"in epoch {trainer.current_epoch + 1}"


def run_summary(trainer: L.Trainer, log_dir: str, images: int, seconds: float) -> str:
    """The end-of-run summary, a few plain lines."""
    lines = [f"vitx run summary: {log_dir}"]
    ckpt = _best(trainer)
    if ckpt is not None and ckpt.best_model_score is not None:
        lines.append(f"best {ckpt.monitor} = {float(ckpt.best_model_score):.4f} ({ckpt.mode}): {ckpt.best_model_path}")
    elif ckpt is not None:
        lines.append(f"best {ckpt.monitor}: not measured (no validation ran)")
    last = [c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")]
    if last:
        lines.append(f"last checkpoint: {last[0]}")
    for key, value in sorted(trainer.callback_metrics.items()):
        if key.startswith("val/") and getattr(value, "numel", lambda: 1)() == 1:
            lines.append(f"final {key} = {float(value):.4f}")
    rate = f", {images / seconds:,.0f} images/s" if seconds > 0 and images else ""
    lines.append(f"trained {images:,} images in {trainer.global_step} steps ({_epochs(trainer)}), "
                 f"{seconds:,.1f} s{rate}")
    for cb in trainer.callbacks:
        flops = getattr(cb, "flops_per_image", None)
        if flops:
            lines.append(f"forward FLOPs per image: {flops / 1e9:.3g} G")
        if type(cb).__name__ == "AttentionAnalysis" and getattr(cb, "runs", 0):
            share = f" ({100 * cb.seconds_total / seconds:.1f}% of the run)" if seconds > 0 else ""
            lines.append(f"attention analysis: {cb.runs} runs, {cb.seconds_total:.1f} s{share}")
    return "\n".join(lines)


def run_callbacks(trainer_config: Dict[str, Any], given: list) -> list:
    """What `vitx` adds to every run, unless the config has its own: the Dashboard, the images-per-second progress
    bar (unless trainer.enable_progress_bar is false) and the model summary with a measured FLOP count (unless
    trainer.enable_model_summary is false). Lightning refuses a progress bar when its own is switched off."""
    from lightning.pytorch.callbacks import ModelSummary as AnyModelSummary
    from lightning.pytorch.callbacks import ProgressBar

    from vit_experiments.callbacks.progress import ModelSummary, images_per_second_bar

    def has(kind) -> bool:
        return any(isinstance(c, kind) for c in given)

    extra: list = [] if has(Dashboard) else [Dashboard()]
    if trainer_config.get("enable_progress_bar") is not False and not has(ProgressBar):
        extra.append(images_per_second_bar())
    if trainer_config.get("enable_model_summary") is not False and not has(AnyModelSummary):
        extra.append(ModelSummary())
        trainer_config["enable_model_summary"] = False  # Lightning's own is not wanted, nor its note about ours
    return extra
