"""`make gpu-check`, data part: the end-to-end training rate on real JPEG shards against the synthetic-batch rate
of the same model, and the loader's own rate.

JPEG shards are written at run time into the work folder from the development machines' ImageNet samples
(/work/shared/data/imagenet-samples, or --photos TAR; never committed), or from the shapes corpus rendered at 256 px
where there are none (as on the GPU machine, which gets only the repository). Three figures, same batch size:

- loader: batches/s of ImageLabelDataModule's training loader alone (16 workers on CUDA; decode, crop, collate);
- end to end: `vitx fit --config conf/vit/pretrain.yaml --config conf/trainer/bf16.yaml` with the ViT made S/16 at
  224 px (the CLI's variant flag), reading those shards with the same workers, timed by a StepTimer;
- synthetic: the same network's training step (benchmarks.throughput.Trainer: bf16 autocast, AdamW) on batches
  already on the device.

end to end / synthetic near 1 says the loader keeps the accelerator fed. The dry run uses the pretrain config's
own 32-px ViT, 2 workers and batches of 8.
"""

from __future__ import annotations

import json
import time

from benchmarks.gpu_check_common import CONF, Context, Section, accelerator_args, run_guarded, vitx
from benchmarks.gpu_check_corpora import pattern, photo_source, write_jpeg_shards
from benchmarks.gpu_check_timer import timer_overlay


def loader_rate(shards: str, batch_size: int, image_size: int, workers: int, batches: int) -> dict:
    from data_pipelines.datamodules import ImageLabelDataModule

    dm = ImageLabelDataModule(train_shards=shards, val_shards=None, batch_size=batch_size, image_size=image_size,
                              num_workers=workers, persistent_workers=False)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # workers started, first batch decoded
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images = next(it)[0]
        except StopIteration:
            break
        n += len(images)
    seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds if seconds else None}


def synthetic_rate(ctx: Context, image_size: int, batch_size: int, steps: int, warmup: int) -> dict:
    import torch

    from benchmarks.candidates import Candidate, classification_loss
    from benchmarks.throughput import Trainer
    from vit_experiments.models.vit import ViTConfig, VisionTransformer

    device = torch.device(ctx.device)
    if ctx.dry:  # conf/vit/pretrain.yaml's own network
        cfg = ViTConfig(variant=None, image_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_dim=256,
                        num_classes=10)
    else:
        cfg = ViTConfig(variant="S/16", image_size=image_size, num_classes=10)
    trainer = Trainer(device, "bf16" if ctx.cuda else "fp32")
    c = Candidate("vitx", VisionTransformer(cfg), classification_loss(lambda m, x: m(x)))
    trainer.setup(c)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=g).to(device),
                torch.randint(0, 10, (batch_size,), generator=g).to(device)) for _ in range(2)]
    trainer.timed(c, batches, warmup)
    step_s, _ = trainer.timed(c, batches, steps)
    return {"step_ms": 1e3 * step_s, "images_per_s": batch_size / step_s}


def run_data(ctx: Context, section: Section) -> None:
    workers = 16 if ctx.cuda else 2
    batch_size, image_size = (256, 224) if ctx.cuda else (8, 32)
    steps, warmup = (20, 5) if ctx.cuda else (2, 1)
    folder = ctx.work / "photos"
    source = photo_source(ctx.options.get("photos"))
    what = write_jpeg_shards(folder, source, batch_size * (steps + warmup + 2), shards=workers)
    section.note(what)
    shards = pattern(folder, "train")
    settings = {"workers": workers, "batch_size": batch_size, "image_size": image_size}

    loader = run_guarded(section, "loader", loader_rate, shards, batch_size, image_size, workers, steps)
    if loader:
        section.row(measure="loader", status="passed", **settings, **loader)

    runs = ctx.work / "data-runs"
    out = runs / "timer.json"
    runs.mkdir(parents=True, exist_ok=True)
    timer = timer_overlay(runs / "timer.yaml", out, warmup=warmup, steps=steps, budget_s=max(5.0, ctx.left() - 10))
    argv = ["fit", "--config", str(CONF / "vit" / "pretrain.yaml")]
    if ctx.cuda:
        argv += ["--config", str(CONF / "trainer" / "bf16.yaml"), "--model.init_args.vit.variant", "S/16",
                 "--model.init_args.vit.image_size", str(image_size)]
    argv += ["--config", str(timer), "--data.init_args.train_shards", shards, "--data.init_args.val_shards", shards,
             "--data.init_args.num_workers", str(workers), "--data.init_args.batch_size", str(batch_size),
             *accelerator_args(ctx, runs / "runs"), "--trainer.max_epochs", "1",
             "--trainer.max_steps", str(steps + warmup), "--trainer.limit_train_batches", str(steps + warmup),
             "--trainer.limit_val_batches", "0"]  # no validation: the val pattern is only required, never read
    run_guarded(section, "end to end", vitx, argv)
    e2e = json.loads(out.read_text()) if out.is_file() else None
    if e2e and e2e.get("images_per_s"):
        section.row(measure="end_to_end", status="passed" if e2e.get("loss_finite") else "failed: non-finite loss",
                    **settings, **e2e)
    elif not section.data["errors"]:
        section.error("end to end: the run timed no step")

    synthetic = run_guarded(section, "synthetic", synthetic_rate, ctx, image_size, batch_size, steps, warmup)
    if synthetic:
        section.row(measure="synthetic", status="passed", **settings, **synthetic)
    if e2e and synthetic and e2e.get("images_per_s"):
        section.data["end_to_end_over_synthetic"] = e2e["images_per_s"] / synthetic["images_per_s"]
        if loader:
            section.data["loader_over_synthetic"] = loader["images_per_s"] / synthetic["images_per_s"]
