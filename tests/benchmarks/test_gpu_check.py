"""`make gpu-check ARGS=--dry-run`: the prepared GPU check's code path on the CPU, run as a user runs it (one
process, `python -m benchmarks.gpu_check --dry-run`), with every section present and passed. What a CPU cannot run
in the dry run is marked "skipped: needs CUDA", never faked: the test checks which rows are skipped, too."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ["train/cnn", "train/vit", "train/deit", "train/clip", "switches", "throughput", "data"]
CPU_OVERLAYS = {"fsdp", "activation_checkpointing"}  # the GPU overlays the dry run trains
CUDA_OVERLAYS = {"bf16", "fp16", "compile"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-check")
    # a generous total budget: on a slow or shared machine the dry run must still run every part (how long it takes
    # is for the benchmark to report, not for a test to assert)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--budget-s", "1500",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    json_file, md_file = out / "gpu-check-dry.json", out / "gpu-check-dry.md"
    assert json_file.is_file(), f"no result file (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(json_file.read_text()), md_file.read_text(), proc


def test_every_section_is_present_and_passed(dry_run):
    result, _, proc = dry_run
    assert list(result["sections"]) == SECTIONS
    failed = {n: (s["status"], s["errors"][:1]) for n, s in result["sections"].items() if s["status"] != "passed"}
    assert not failed, f"sections not passed: {failed}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["dry_run"] is True and result["seconds"] > 0


@pytest.mark.parametrize("family", ["cnn", "vit", "deit", "clip"])
def test_each_family_trains_under_the_overlays_a_cpu_runs(dry_run, family):
    rows = {r["overlay"]: r for r in dry_run[0]["sections"][f"train/{family}"]["rows"]}
    assert set(rows) == CPU_OVERLAYS | CUDA_OVERLAYS
    for name in CPU_OVERLAYS:
        r = rows[name]
        assert r["status"] == "passed", r
        assert r["loss_finite"] is True and math.isfinite(r["loss"])
        assert r["steps_timed"] >= 1 and r["step_ms"] > 0
        assert r["checkpoint"] and r["config"].startswith(f"conf/{family}/")
    for name in CUDA_OVERLAYS:
        assert rows[name]["status"].startswith("skipped: needs CUDA"), rows[name]


def test_switches_are_measured_off_and_on(dry_run):
    rows = {r["switch"]: r for r in dry_run[0]["sections"]["switches"]["rows"]}
    assert set(rows) == {"fused_adamw", "guard_sync_every_50", "no_progress_bar", "pin_memory", "compile_whole_model"}
    for name in ("fused_adamw", "guard_sync_every_50", "no_progress_bar"):
        assert rows[name]["status"] == "passed", rows[name]
        assert rows[name]["off"]["images_per_s"] > 0 and rows[name]["on"]["images_per_s"] > 0
        assert rows[name]["on_over_off"] > 0
    for name in ("pin_memory", "compile_whole_model"):
        assert rows[name]["status"] == "skipped: needs CUDA"


def test_throughput_compares_with_transformers_and_measures_mfu(dry_run):
    section = dry_run[0]["sections"]["throughput"]
    measured = {r["impl"]: r for r in section["rows"] if r["status"] == "passed"}
    assert {"vitx", "transformers"} <= set(measured)
    assert section["peak_tflops"] > 0 and "measured in this run" in section["peak_source"]
    for r in measured.values():
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1.5
    assert measured["vitx"]["speedup_vs_transformers"] > 0
    timm = section["references"]["timm"]
    assert timm.startswith("not installed") or "timm" in measured  # reported either way, never a crash


def test_data_compares_end_to_end_with_synthetic_batches(dry_run):
    section = dry_run[0]["sections"]["data"]
    rows = {r["measure"]: r for r in section["rows"]}
    assert set(rows) == {"loader", "end_to_end", "synthetic"}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert section["end_to_end_over_synthetic"] > 0
    assert "JPEG samples" in section["notes"][0]


def test_the_table_names_every_section(dry_run):
    result, md, _ = dry_run
    assert "dry run" in md
    for name in SECTIONS:
        assert f"## {name}: passed" in md
