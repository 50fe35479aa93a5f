"""What the analysis callback costs against training: one analysis (analyze_model on the probe batch and on the
labelled representation set, CKA and probes, plus the files the callback writes) against the training steps between
two analyses at the default frequency (once per epoch).

    python -m benchmarks.analysis_cost --preset pretrain    # conf/vit/pretrain.yaml's model, batch and epoch
    python -m benchmarks.analysis_cost --preset s16         # ViT-S/16 at 224 px, an ImageNet-1k epoch

A training step here is what the classification task does per batch: forward, cross-entropy, backward and an
AdamW step, on random images (the data pipeline is left out, which makes training look cheaper and the share
larger). Analysis and training steps are timed in alternating rounds and the medians taken, so that load from
other processes on a shared machine falls on both alike; the figure that matters is the ratio

    share = t_analysis / (steps_per_epoch * t_step),   steps_per_epoch = epoch_images / batch_size,

with t_step measured at --batch-size and scaled linearly to the run's batch (--run-batch) when they differ
(training cost is linear in the batch for a fixed model; a GPU is faster at large batches, which would raise the
share). Results go to benchmarks/results/analysis_cost-<preset>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

PRESETS = {
    # conf/vit/pretrain.yaml: 6 layers, width 128, 4 heads, 4-px patches at 32 px; batch 128; 20 shards of 1000
    "pretrain": dict(vit=dict(variant=None, image_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
                              mlp_dim=256, num_classes=10), batch=128, run_batch=128, epoch_images=20000),
    # ViT-S/16 at 224 px on ImageNet-1k (DeiT's recipe: batch 1024); timed at a CPU-sized batch and scaled
    "s16": dict(vit=dict(variant="S/16", image_size=224, num_classes=1000), batch=8, run_batch=1024,
                epoch_images=1281167),
}


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.analysis_cost", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="pretrain")
    p.add_argument("--batch-size", type=int, default=None, help="batch the training step is timed at")
    p.add_argument("--num-images", type=int, default=8, help="probe batch (the callback's default, 8)")
    p.add_argument("--representation-images", type=int, default=256,
                   help="labelled set for CKA and the probes (the callback's default, 256; 0: off)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of (analysis, steps)")
    p.add_argument("--steps", type=int, default=3, help="training steps timed per round")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)

    from vit_experiments.analysis.report import analyze_model, save_report
    from vit_experiments.callbacks.analysis import REPRESENTATION_BATCH
    from vit_experiments.models.vit import ViTConfig, VisionTransformer

    preset = PRESETS[args.preset]
    batch = args.batch_size or preset["batch"]
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**preset["vit"]))
    size = model.cfg.image_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, model.cfg.num_classes, (batch,))
    probe = torch.randn(args.num_images, 3, size, size)
    display = torch.randint(0, 256, (args.num_images, 3, size, size), dtype=torch.uint8)
    m = args.representation_images
    # as the callback passes its representation set: normalised images, labels, the task's number of classes
    rep = dict(representation_images=torch.randn(m, 3, size, size), num_classes=model.cfg.num_classes,
               representation_labels=torch.randint(0, model.cfg.num_classes, (m,)),
               representation_batch_size=REPRESENTATION_BATCH) if m else {}

    def step():
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    parts = {}

    def analysis():
        with tempfile.TemporaryDirectory() as d:  # as the callback: every figure drawn, files written
            t0 = time.perf_counter()
            result = analyze_model(model, probe, display, figures=True, **rep)
            parts.setdefault("analyze_model", []).append(time.perf_counter() - t0)
            t1 = time.perf_counter()
            save_report(result, d, figures=True)
            parts.setdefault("save_report", []).append(time.perf_counter() - t1)
            parts.setdefault("callback", []).append(time.perf_counter() - t0)  # what one analysis of the callback costs
            # the numbers alone, without any figure: what the new analyses add to the forward pass
            parts.setdefault("numbers_only", []).append(_time(lambda: analyze_model(model, probe, figures=False)))
            if m:  # the representation set's share: CKA and probes on it, against the probe batch's CKA
                with_set = _time(lambda: analyze_model(model, probe, figures=False, **rep))
                parts.setdefault("representation_set", []).append(with_set - parts["numbers_only"][-1])

    step()  # warm-up: allocator, first-call overheads
    analysis()
    parts.clear()
    t_analysis, t_step = [], []
    for _ in range(args.rounds):
        analysis()
        t_analysis.append(parts["callback"][-1])
        t_step.append(_time(lambda: [step() for _ in range(args.steps)]) / args.steps)
    ta, ts = statistics.median(t_analysis), statistics.median(t_step)
    run_batch = preset["run_batch"]
    ts_run = ts * run_batch / batch
    steps_per_epoch = preset["epoch_images"] / run_batch
    record = {
        "preset": args.preset, "model": preset["vit"], "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "probe_images": args.num_images, "representation_images": m,
        "analysis_seconds": ta, "analysis_seconds_all": t_analysis,
        "analyze_model_seconds": statistics.median(parts["analyze_model"]),
        "save_report_seconds": statistics.median(parts["save_report"]),
        "numbers_only_seconds": statistics.median(parts["numbers_only"]),
        "representation_set_seconds": statistics.median(parts["representation_set"]) if m else 0.0,
        "step_seconds": ts, "step_batch": batch, "step_seconds_all": t_step,
        "run_batch": run_batch, "step_seconds_at_run_batch": ts_run, "steps_per_epoch": steps_per_epoch,
        "share_once_per_epoch": ta / (ta + steps_per_epoch * ts_run),
        "analysis_in_training_steps": ta / ts_run,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"analysis_cost-{args.preset}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"{args.preset}: one analysis {ta:.2f} s (analyze_model {record['analyze_model_seconds']:.2f} s, of which "
          f"numbers only {record['numbers_only_seconds']:.2f} s, the {m}-image representation set "
          f"{record['representation_set_seconds']:.2f} s; files {record['save_report_seconds']:.2f} s); "
          f"a training step {ts:.3f} s at batch {batch} -> {ts_run:.2f} s at batch {run_batch}; "
          f"{steps_per_epoch:.0f} steps per epoch: the analysis is {ta / ts_run:.2f} steps, "
          f"{100 * record['share_once_per_epoch']:.3f}% of training at once per epoch "
          f"(load average {record['load_average'][0]:.1f}); wrote {path}")
    return record


if __name__ == "__main__":
    main()
