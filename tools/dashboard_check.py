"""`make dashboard-check`: a short run of the default experiment, looked at in TensorBoard as a user would.

    python tools/dashboard_check.py [--out runs/dashboard-check] [--chromium chromium] [--port 6123]

1. Writes a small synthetic shapes corpus (1,024 training and 128 validation images at 32 px) and trains
   conf/vit/pretrain.yaml on it twice, at two learning rates, for 2 epochs with the attention analysis every
   8 steps (about a minute each on a CPU).
2. Starts TensorBoard on the run and checks, through its HTTP data API, that every expected tag is there (and none
   of the meaningless ones): scalars, images and their sizes, the custom-scalars layout, the HParams metrics and
   hyperparameters, the config and summary texts.
3. Takes headless-Chromium screenshots of the Time Series, Scalars, Custom Scalars, Images, HParams and Text
   tabs into <out>/screenshots/<tab>.png, and of each analysis figure at its actual size (image_<name>.png);
   skipped with a note when no Chromium is found (`apt-get install -y chromium`).
Exits 1 naming every failed check.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MUST_HAVE = ("train/loss", "train/acc1", "train/lr", "val/loss", "val/acc1", "val/acc5",
             "analysis/attention_distance/layer_01", "analysis/prefix_attention/layer_01",
             "analysis/position_embedding/topology_score", "perf/train_images_per_sec", "perf/analysis_seconds",
             "data/train_samples_read")
MUST_NOT = ("hp_metric", "epoch", "train/batches", "train/samples", "train/time", "validate/batches")
IMAGES = ("analysis/attention_distance", "analysis/position_similarity", "analysis/rollout", "analysis/patch_filters")
MIN_WIDTH = 400  # px: a labelled figure, not a strip of raw pixels


LEARNING_RATES = ("1e-3", "3e-3")  # two runs, so that the HParams tab has something to compare


def train(out: Path) -> None:
    from data_pipelines.writers import write_synthetic

    data = out / "shapes"
    if not (data / "sizes.json").exists():
        write_synthetic(data, num_train=1024, num_val=128, image_size=32, seed=0, shard_size=256)
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    for lr in LEARNING_RATES:
        cmd = [str(BIN / "vitx"), "fit", "--config", str(REPO / "conf" / "vit" / "pretrain.yaml"),
               "--data.train_shards", str(data / "train-{000000..000003}.tar"),
               "--data.val_shards", str(data / "val-000000.tar"), "--data.synthesize_if_missing", "false",
               "--data.batch_size", "64", "--data.num_workers", "0", "--trainer.max_epochs", "2",
               "--trainer.log_every_n_steps", "2", "--trainer.logger.init_args.save_dir", str(runs),
               "--trainer.callbacks.window_size", "4",  # the last callback, ImageThroughput
               "--model.optim.lr", lr, "--analysis.every_n_steps", "8", "--analysis.every_n_epochs", "0"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw[:1] in (b"{", b"[") else raw


def start_tensorboard(logdir: Path, port: int) -> subprocess.Popen:
    # its messages go to a file, not a pipe: a pipe nobody reads fills up and blocks TensorBoard
    log_path = logdir / "tensorboard.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(BIN / "tensorboard"), "--logdir", str(logdir), "--port", str(port),
                                 "--host", "127.0.0.1", "--reload_interval", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if get(f"{base}/data/plugin/scalars/tags"):
                return proc
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"TensorBoard did not answer on {base}: {log_path.read_text(errors='replace')[-2000:]}")


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR header."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def check_api(base: str) -> list[str]:
    """Every failed check, as a line."""
    bad = []
    scalars = get(f"{base}/data/plugin/scalars/tags")
    if len(scalars) != len(LEARNING_RATES):
        bad.append(f"expected {len(LEARNING_RATES)} runs, TensorBoard has {sorted(scalars)}")
    run = sorted(scalars)[0]
    tags = set(scalars[run])
    bad += [f"scalar {t} missing" for t in MUST_HAVE if t not in tags]
    bad += [f"scalar {t} should not be logged" for t in MUST_NOT if t in tags]
    bad += [f"top-level tag {t} outside train/ val/ analysis/ data/ perf/" for t in tags
            if t.split("/")[0] not in ("train", "val", "analysis", "data", "perf")]
    images = get(f"{base}/data/plugin/images/tags")[run]
    for tag in IMAGES:
        if tag not in images:
            bad.append(f"image {tag} missing")
            continue
        last = get(f"{base}/data/plugin/images/images?run={run}&tag={urllib.request.quote(tag)}")[-1]
        width, _ = png_size(get(f"{base}/data/plugin/images/individualImage?{last['query']}"))
        if width < MIN_WIDTH:
            bad.append(f"image {tag} is {width} px wide (a labelled figure is >= {MIN_WIDTH})")
    layout = get(f"{base}/data/plugin/custom_scalars/layout")
    charts = {c["title"]: c["multiline"]["tag"] for cat in layout.get("category", []) for c in cat["chart"]}
    for title in ("loss", "top-1 accuracy", "attention_distance per layer", "prefix_attention per layer"):
        if title not in charts:
            bad.append(f"custom-scalars chart {title!r} missing (have {sorted(charts)})")
    exp = get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
    metrics = {m["name"]["tag"] for m in exp.get("metricInfos", [])}
    hparams = {h.get("displayName") or h["name"] for h in exp.get("hparamInfos", [])}
    bad += [f"hparams metric {m} missing" for m in ("val/acc1", "val/loss") if m not in metrics]
    bad += [f"hparams {h} missing" for h in ("lr", "batch_size", "global_batch", "devices", "precision", "strategy",
                                             "vit.embed_dim", "vit.depth") if h not in hparams]
    bad += [f"hparams column {h} is an internal" for h in hparams if h.startswith("_")]
    first = [h.get("displayName") for h in exp.get("hparamInfos", [])][:5]
    if first != ["model", "params_M", "lr", "global_batch", "precision"]:
        bad.append(f"the HParams table's first columns are {first}")
    sessions = get(f"{base}/data/plugin/hparams/session_groups", {"experimentName": "", "allowedStatuses": [
        "STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"], "colParams": [], "startIndex": 0,
        "sliceSize": 100})
    groups = sessions.get("sessionGroups", [])
    if len(groups) != len(LEARNING_RATES):
        bad.append(f"expected a session per run in the HParams tab, have {len(groups)}")
    for group in groups:
        if not {m["name"]["tag"] for m in group.get("metricValues", [])} >= {"val/acc1", "val/loss"}:
            bad.append(f"session {group.get('name')} has no val/acc1 or val/loss value")
    texts = [t.removesuffix("/text_summary") for t in get(f"{base}/data/plugin/text/tags").get(run, [])]
    bad += [f"text {t} missing" for t in ("run/config", "run/summary") if t not in texts]
    print(f"TensorBoard API: {len(tags)} scalar tags, {len(images)} images, {len(charts)} custom-scalars charts, "
          f"{len(hparams)} hparams x {len(metrics)} metrics, texts {sorted(texts)}")
    return bad


def find_chromium(given: str | None) -> str | None:
    for name in ([given] if given else []) + ["chromium", "chromium-browser", "google-chrome"]:
        path = shutil.which(name)
        if path:
            return path
    return None


# (file name, URL fragment, window width, height): the tabs, smoothing off so that the few analysis points show
# as they are; the HParams table is wide (every metric column beside the hyperparameters)
SHOTS = (
    ("timeseries", "timeseries", 1500, 1600),  # the tab TensorBoard opens on
    ("scalars", "scalars&_smoothingWeight=0", 1500, 1600),
    ("custom_scalars", "custom_scalars&_smoothingWeight=0", 1500, 2300),
    ("images", "images", 1500, 1500),
    ("hparams", "hparams", 2400, 900),
    ("text", "text", 1500, 2400),  # the config card, then the run summary below it
)


def shoot(chromium: str, url: str, path: Path, width: int, height: int) -> None:
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--window-size={width},{height}", "--virtual-time-budget=20000", f"--screenshot={path}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    print(f"screenshot: {path}")


def screenshots(chromium: str, base: str, out: Path) -> list[Path]:
    """The tabs, then each analysis figure at its actual size as TensorBoard serves it (the Images tab shrinks
    every image to its card's width unless "Show actual image size" is ticked)."""
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    for name, fragment, width, height in SHOTS:
        shots.append(out / f"{name}.png")
        shoot(chromium, f"{base}/#{fragment}", shots[-1], width, height)
    images = get(f"{base}/data/plugin/images/tags")
    run = sorted(images)[0]
    for tag in images[run]:
        last = get(f"{base}/data/plugin/images/images?run={run}&tag={urllib.request.quote(tag)}")[-1]
        url = f"{base}/data/plugin/images/individualImage?{last['query']}"
        width, height = png_size(get(url))
        shots.append(out / f"image_{tag.split('/')[-1]}.png")
        shoot(chromium, url, shots[-1], width + 16, height + 16)
    return shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "dashboard-check")
    ap.add_argument("--chromium", default=None, help="the browser binary (default: chromium on PATH)")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--skip-train", action="store_true", help="look at the run a previous check left in --out")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_train:
        train(out)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    tb = start_tensorboard(out / "runs", port)
    try:
        time.sleep(3)  # a reload after the run's last events
        bad = check_api(base)
        chromium = find_chromium(args.chromium)
        if chromium is None:
            print("no Chromium found (apt-get install -y chromium): screenshots skipped")
        else:
            screenshots(chromium, base, out / "screenshots")
    finally:
        tb.terminate()
        tb.wait(timeout=30)
    for line in bad:
        print("FAILED:", line)
    print("dashboard check:", "FAILED" if bad else "passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
