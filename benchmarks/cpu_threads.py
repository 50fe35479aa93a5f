"""CPU thread policy of `vitx fit` on a shared machine: torch's defaults against vitx's policy
(vit_experiments/threads.py), idle and beside competing CPU-bound processes, as ratios measured in one run.

    python -m benchmarks cpu_threads                    # conf/vit/pretrain.yaml, idle and beside 1 busy process
    python -m benchmarks cpu_threads --competitors 0,1,2 --candidates OMP_NUM_THREADS=1
    make bench ARGS="cpu_threads --rounds 2"

Each arm is a real `vitx fit --config conf/vit/pretrain.yaml` in a fresh process (the wait policy is read when
torch loads, so it cannot change inside one process) on a small shapes corpus written to a temporary folder,
with the shipped data loader (its 2 workers); a StepTimer (benchmarks/gpu_check_timer.py) times steps after a
warm-up. Competitors are `while True: pass` processes started by this benchmark before the arm and killed after
it. Arms alternate within a round, so that load from other jobs falls on every arm alike; the machine's load
average is reported with the figures, since "idle" on a shared machine is not idle.

Arms: `torch` (VITX_THREADS=off: torch's own threads, GNU OpenMP's default wait), `vitx` (what `vitx` sets by
itself), and any --candidates (environment settings, tried with VITX_THREADS=off). Writes cpu_threads.json and .md
to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu_check_timer import timer_overlay  # noqa: E402

CONFIG = REPO / "conf" / "vit" / "pretrain.yaml"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "VITX_THREADS")


def arm_environment(arm: str) -> dict[str, str]:
    """The environment of one arm: thread settings of this shell removed, then the arm's own."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if arm == "vitx":
        return env
    env["VITX_THREADS"] = "off"
    if arm != "torch":
        for setting in arm.split(","):
            key, _, value = setting.partition("=")
            env[key.strip()] = value.strip()
    return env


def write_corpus(folder: Path, batch: int, batches: int) -> tuple[str, str]:
    from data_pipelines.writers import write_synthetic

    patterns = write_synthetic(folder, num_train=batch * batches, num_val=16, image_size=32, seed=0,
                               shard_size=batch * batches // 4)
    return patterns["train"], patterns["val"]


def run_arm(arm: str, competitors: int, args, shards: tuple[str, str], work: Path, tag: str) -> dict:
    out = work / f"{tag}.json"
    overlay = timer_overlay(work / f"{tag}.yaml", out, warmup=args.warmup, steps=args.steps)
    cmd = [sys.executable, "-m", "vit_experiments.cli", "fit", "--config", str(CONFIG), "--config", str(overlay),
           "--data.init_args.train_shards", shards[0], "--data.init_args.val_shards", shards[1],
           "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
           "--trainer.max_steps", str(args.warmup + args.steps),
           "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(work / "runs")]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=arm_environment(arm), capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"images_per_s": None, "load_average_at_start": load, "error": f"timed out after {args.timeout} s"}
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"arm {arm!r} with {competitors} competitor(s) failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["load_average_at_start"] = load
    return result


def measure(args) -> dict:
    arms = ["torch", "vitx"] + args.candidates
    rows: dict[tuple[str, int], list[float]] = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="vitx-cpu-threads-") as tmp:
        work = Path(tmp)
        shards = write_corpus(work / "shapes", batch=128, batches=args.warmup + args.steps + 4)
        for r in range(args.rounds):
            for competitors in args.competitors:
                for arm in arms:
                    res = run_arm(arm, competitors, args, shards, work, f"r{r}-c{competitors}-{len(rows)}")
                    rate = res["images_per_s"] or 0.0  # a run that timed out counts as (near) zero
                    rows.setdefault((arm, competitors), []).append(rate)
                    loads.append(res["load_average_at_start"])
                    print(f"  round {r}: {arm:24s} beside {competitors} busy: {rate:7.1f} images/s "
                          f"(load {res['load_average_at_start']:.2f}){' ' + res['error'] if 'error' in res else ''}",
                          flush=True)
    idle = min(args.competitors)
    table = []
    def median(key):
        return statistics.median(rows[key]) or float("nan")

    for (arm, competitors), rates in rows.items():
        rate = statistics.median(rates)
        table.append({
            "arm": arm, "competitors": competitors, "images_per_s": rate, "rounds": rates,
            "vs_torch_same_load": rate / median(("torch", competitors)),
            "vs_own_idle": rate / median((arm, idle)),
            "vs_torch_idle": rate / median(("torch", idle)),
        })
    return {"config": str(CONFIG.relative_to(REPO)), "cpu_count": os.cpu_count(), "rows": table,
            "load_average_min_max": [min(loads), max(loads)], "settings": {k: v for k, v in vars(args).items()
                                                                           if k != "out"},
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def markdown(result: dict) -> str:
    lo, hi = result["load_average_min_max"]
    lines = [f"`vitx fit --config {result['config']}` on {result['cpu_count']} CPUs, images/s (median of "
             f"{result['settings']['rounds']} round(s) of {result['settings']['steps']} steps); load average "
             f"{lo:.2f}-{hi:.2f} at the arms' starts (other jobs included); {result['date']}.", "",
             "| threads | busy processes beside it | images/s | vs torch's default, same load | vs its own idle "
             "rate | vs torch's default idle |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(result["rows"], key=lambda r: (r["competitors"], r["arm"])):
        lines.append(f"| {r['arm']} | {r['competitors']} | {r['images_per_s']:.0f} | {r['vs_torch_same_load']:.2f} | "
                     f"{r['vs_own_idle']:.2f} | {r['vs_torch_idle']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks cpu_threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--competitors", default="0,1", help="numbers of busy processes beside the run (comma-separated)")
    p.add_argument("--candidates", default="", help="extra arms: environment settings, ';' between arms, e.g. "
                                                    "'OMP_NUM_THREADS=1;GOMP_SPINCOUNT=10000'")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each run")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each run (batches of 128)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run before it counts as failed")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    args.competitors = [int(c) for c in args.competitors.split(",") if c.strip()]
    args.candidates = [c.strip() for c in args.candidates.split(";") if c.strip()]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_threads.json").write_text(json.dumps(result, indent=1))
    (args.out / "cpu_threads.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out / 'cpu_threads.json'} and .md")
    return result


if __name__ == "__main__":
    main()
