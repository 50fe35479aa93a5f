"""Exact mid-epoch resume through the real `vitx fit` (issue 14): the shipped conf/vit/pretrain.yaml, shrunk onto
tiny shards, on 2 gloo processes x 2 dataloader workers. An uninterrupted run records the samples each rank trains
on at every batch; a second run saving a checkpoint every few steps is killed with SIGKILL (the whole job: torchrun,
ranks, workers) after a mid-epoch checkpoint; runs resumed from its checkpoints (mid-epoch, on the last batch of an
epoch, and the shipped `last.ckpt` of the epoch-end validation) continue with exactly the samples, order and
augmented pixels of the uninterrupted run, per rank, through the end of that epoch and the next one. The same with
gradient accumulation (conf/trainer/grad_accum.yaml).

The corpus labels each sample with its global index, so the labels of a batch name its samples (see _resume_ddp).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from tests.conftest import REPO

PRETRAIN = REPO / "conf" / "vit" / "pretrain.yaml"
GRAD_ACCUM = REPO / "conf" / "trainer" / "grad_accum.yaml"
TRAIN, SHARD, BATCH, RANKS = 128, 16, 4, 2  # 8 shards; 16 batches per rank per epoch
EPOCHS = 2
# (accumulate_grad_batches, checkpoint every n optimizer steps, killed at step, resumed from)
PLAIN = dict(accumulate=1, every=8, kill=27, resume=["step=8", "step=16", "last", "step=24"])
ACCUM = dict(accumulate=2, every=3, kill=11, resume=["step=3"])  # 8 steps per epoch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def write_corpus(out: Path) -> tuple[str, str]:
    """Synthetic shapes whose label is the sample's global index (classes.json names them), 16 px."""
    from data_pipelines.metadata import write_classes, write_sizes
    from data_pipelines.synthetic import synthetic_samples
    from data_pipelines.writers import ShardSink, pattern_for

    out.mkdir(parents=True, exist_ok=True)
    write_classes(out, [f"sample{i}" for i in range(TRAIN)])
    patterns = []
    for split, num in (("train", TRAIN), ("val", 16)):
        with ShardSink(out, split, shard_size=SHARD) as sink:
            for i, (key, jpg, _) in enumerate(synthetic_samples(num, split, image_size=16, seed=0)):
                sink.write({"__key__": key, "jpg": jpg, "cls": str(i).encode()})
        write_sizes(out, sink.sizes)
        patterns.append(pattern_for(out, split, len(sink.sizes)))
    return patterns[0], patterns[1]


def fit_args(tmp: Path, name: str, data: tuple[str, str], accumulate: int, callbacks: list, *extra: str,
             devices: int = RANKS) -> list[str]:
    """`vitx fit` with the shipped pretrain.yaml shrunk onto the tiny corpus, recording samples in tmp/name."""
    overlay = tmp / f"{name}.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks+": [
        {"class_path": "tests.distributed._resume_ddp.RecordSamples", "init_args": {"dir": str(tmp / name)}},
        *callbacks,
    ]}}))
    args = ["fit", "--config", str(PRETRAIN)]
    if accumulate > 1:
        args += ["--config", str(GRAD_ACCUM), "--trainer.accumulate_grad_batches", str(accumulate)]
    return args + [
        "--config", str(overlay),
        "--data.train_shards", data[0], "--data.val_shards", data[1], "--data.synthesize_if_missing", "false",
        "--data.batch_size", str(BATCH), "--data.num_workers", "2", "--data.shuffle_buffer", "16",
        "--model.vit.image_size", "16", "--model.vit.embed_dim", "16", "--model.vit.depth", "1",
        "--model.vit.num_heads", "2", "--model.vit.mlp_dim", "32", "--model.optim.warmup_steps", "4",
        "--trainer.logger.init_args.save_dir", str(tmp / name / "runs"), "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--trainer.max_epochs", str(EPOCHS),
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", *extra,
    ]


def torchrun(tmp: Path, jobs: list[list[str]], name: str) -> subprocess.CompletedProcess:
    (tmp / f"{name}.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
           "-m", "tests.distributed._resume_ddp", str(tmp / f"{name}.json")]
    try:  # a session of its own: KillAt kills this process group, and only it
        return subprocess.run(cmd, cwd=tmp, env=env, timeout=300, capture_output=True, text=True,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: the 2-process runs did not finish within 300 s (ranks hanging at a collective?)")


def records(tmp: Path, name: str, rank: int) -> list[dict]:
    return [json.loads(line) for line in (tmp / name / f"rank{rank}.jsonl").read_text().splitlines()]


def checkpoint(tmp: Path, variant: str, which: str) -> Path:
    if which == "last":
        (path,) = (tmp / f"{variant}-killed" / "runs").rglob("last.ckpt")
        return path
    return tmp / f"{variant}-steps" / f"{which}.ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both killed runs (one launch each, ended by SIGKILL), then the uninterrupted and resumed runs (one launch)."""
    tmp = tmp_path_factory.mktemp("resume")
    data = write_corpus(tmp / "shards")
    final = []
    for variant, cfg in (("plain", PLAIN), ("accum", ACCUM)):
        steps = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp / f"{variant}-steps"), "filename": "{step}",
                               "every_n_train_steps": cfg["every"], "save_top_k": -1, "save_last": False}}
        kill = {"class_path": "tests.distributed._resume_ddp.KillAt", "init_args": {"step": cfg["kill"]}}
        proc = torchrun(tmp, [fit_args(tmp, f"{variant}-killed", data, cfg["accumulate"], [steps, kill])],
                        f"{variant}-killed")
        assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), proc.stdout[-3000:] + proc.stderr[-6000:]
        final.append(fit_args(tmp, f"{variant}-full", data, cfg["accumulate"], []))
        for which in cfg["resume"]:
            final.append(fit_args(tmp, f"{variant}-from-{which}", data, cfg["accumulate"], [],
                                  "--ckpt_path", str(checkpoint(tmp, variant, which))))
    proc = torchrun(tmp, final, "final")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp


def _position(rec: dict) -> tuple[int, int]:
    return rec["epoch"], rec["batch"]


@pytest.mark.parametrize("variant, cfg", [("plain", PLAIN), ("accum", ACCUM)], ids=["plain", "grad-accum"])
def test_a_run_killed_and_resumed_reads_the_samples_of_an_uninterrupted_one(runs, variant, cfg):
    per_epoch = TRAIN // (BATCH * RANKS)
    for rank in range(RANKS):
        full = records(runs, f"{variant}-full", rank)
        assert len(full) == EPOCHS * per_epoch
        assert full[-1]["step"] == EPOCHS * per_epoch // cfg["accumulate"]
        killed = records(runs, f"{variant}-killed", rank)
        assert killed[-1]["step"] >= cfg["kill"] - 1 and len(killed) < len(full)  # it died mid-run
        for which in cfg["resume"]:
            ckpt = torch.load(checkpoint(runs, variant, which), map_location="cpu", weights_only=True)
            step = ckpt["global_step"]
            assert which == "last" or which == f"step={step}"
            # what the killed run had trained on when the checkpoint was written: every step-N checkpoint is
            # written at the end of the batch whose optimizer step is step N (the first batch recorded at N);
            # last.ckpt at the end of the epoch's validation, after all of its batches
            if which == "last":
                assert step == per_epoch // cfg["accumulate"], "last.ckpt should be the first epoch's end"
                upto = sum(r["epoch"] <= ckpt["epoch"] for r in killed)
            else:
                upto = next(i for i, r in enumerate(killed) if r["step"] == step) + 1
            resumed = records(runs, f"{variant}-from-{which}", rank)
            assert resumed, f"{which}: the resumed run trained on nothing"
            got = killed[:upto] + resumed
            assert [_position(r) for r in got] == [_position(r) for r in full], f"{which}, rank {rank}: batch order"
            assert [r["step"] for r in got] == [r["step"] for r in full], f"{which}, rank {rank}: step count"
            assert [r["labels"] for r in got] == [r["labels"] for r in full], f"{which}, rank {rank}: samples"
            assert [r["pixels"] for r in got] == [r["pixels"] for r in full], f"{which}, rank {rank}: augmentation"
    # and the uninterrupted run is the exact epoch it should be: every sample once per epoch across the ranks
    for epoch in range(EPOCHS):
        seen = sorted(x for rank in range(RANKS) for r in records(runs, f"{variant}-full", rank)
                      if r["epoch"] == epoch for x in r["labels"])
        assert seen == list(range(TRAIN))
    epoch_orders = [[x for r in records(runs, f"{variant}-full", 0) if r["epoch"] == e for x in r["labels"]]
                    for e in range(EPOCHS)]
    assert epoch_orders[0] != epoch_orders[1]  # shuffled anew every epoch


def test_checkpoints_hold_every_ranks_stream_position_in_plain_types(runs):
    ckpt = torch.load(checkpoint(runs, "plain", "step=8"), map_location="cpu", weights_only=True)
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["world_size"] == RANKS and [s["rank"] for s in state["ranks"]] == list(range(RANKS))
    assert all(s["epoch"] == 0 and s["batches"] == 8 and s["num_workers"] == 2 for s in state["ranks"])
