"""Tiny Lightning modules and loaders for the callback tests (importable by the DDP test's subprocess)."""
import os

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from vit_experiments.callbacks.analysis import AttentionAnalysis
from vit_experiments.models.vit import ViTConfig, VisionTransformer


def tiny_vit(**kw) -> VisionTransformer:
    cfg = dict(variant=None, image_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    return VisionTransformer(ViTConfig(**{**cfg, **kw}))


class TinyClassifier(L.LightningModule):
    """A ViT on float images, no normalisation, no analysis_backbone hook: the callback finds `self.model`."""

    def __init__(self, **vit):
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_vit(**vit)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyCLIPLike(TinyClassifier):
    """The image tower sits at model.visual, as in a CLIP module."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.visual = tiny_vit(num_classes=0)
        self.head = torch.nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.model.visual.forward_head(self.model.visual.forward_features(x))), y)

    def validation_step(self, batch, batch_idx):
        pass


def loaders(n=32, batch_size=8, uint8=False, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    if uint8:
        x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=True), DataLoader(ds, batch_size=batch_size), x


class MarkingAnalysis(AttentionAnalysis):
    """Leaves a file naming the rank and step of every analysis it runs."""

    def __init__(self, marker_dir: str, **kw):
        super().__init__(**kw)
        self.marker_dir = marker_dir

    def _run(self, trainer, pl_module, step):
        result = super()._run(trainer, pl_module, step)
        open(os.path.join(self.marker_dir, f"ran_rank{trainer.global_rank}_step{step}"), "w").close()
        return result


def ddp_fit(out_dir: str) -> None:
    """Two CPU processes (gloo; forked, which starts much faster than spawned), the analysis every step; each
    analysis leaves a marker naming its rank."""
    import warnings

    from lightning.pytorch.loggers import TensorBoardLogger

    warnings.filterwarnings("ignore")
    train, val, _ = loaders(n=32, batch_size=4)
    cb = MarkingAnalysis(out_dir, num_images=2, every_n_steps=1, every_n_epochs=1, save_figures=False)
    trainer = L.Trainer(
        strategy="ddp_fork", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
        logger=TensorBoardLogger(out_dir, name="run", version=0), callbacks=[cb], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
    )
    trainer.fit(TinyClassifier(), train, val)
    open(os.path.join(out_dir, "done"), "w").close()
