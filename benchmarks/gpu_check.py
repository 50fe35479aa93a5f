"""`make gpu-check`: the prepared check of vitx on one CUDA device, in at most 8 minutes with compilation.

    make gpu-check                         # == python -m benchmarks.gpu_check, on a machine with a GPU
    make gpu-check ARGS=--dry-run          # the same code path on the CPU: tiny sizes, 2 steps (make test runs it)
    python -m benchmarks.gpu_check --only throughput --budget-s 200
    python -m benchmarks.gpu_check --render benchmarks/results/gpu-check.json

Sections (each its own part with its own share of the time budget; a part that fails or runs out of time never
stops the others, and says what went wrong):

- train/cnn, train/vit, train/deit, train/clip: each family's shipped experiment under each GPU overlay (bf16,
  fp16, FSDP2 on the one device, activation checkpointing, compile) through `vitx fit`: pass/fail, finite loss,
  step time, peak memory (benchmarks/gpu_check_train.py);
- switches: each speed-up of the training step off and on (benchmarks/gpu_check_switches.py);
- throughput: vitx against `transformers` and timm, MFU against a matmul of this run (benchmarks/gpu_check_throughput.py);
- data: end-to-end rate on JPEG shards with 16 loader workers against the synthetic-batch rate
  (benchmarks/gpu_check_data.py).

On CUDA every part runs in its own process (a crash or a hung compile costs that part only; it is killed at its
budget and keeps the rows it had written). Writes gpu-check.json and gpu-check.md (dry run: gpu-check-dry.*) to --out.
Corpora are written at run time into a temporary folder and deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vit_experiments import threads  # noqa: E402

# the parts run `vitx fit` in this process: the thread policy that the `vitx` command sets, set here first
threads.configure()

from benchmarks.gpu_check_common import Context, Section, load_average, run_guarded  # noqa: E402

# part -> seconds of the 480-second budget on CUDA (the rest is start-up, corpora and slack)
SHARES = {"train/cnn": 55, "train/vit": 55, "train/deit": 60, "train/clip": 60, "switches": 70, "throughput": 110,
          "data": 40}
GRACE_S = 30  # past its budget, an isolated part is killed


def options(dry: bool) -> dict:
    if dry:
        return {"train_steps": 2, "train_warmup": 1, "train_batch_size": 8, "corpus_images": 64,
                "switch_steps": 2, "switch_warmup": 1}
    return {"train_steps": 30, "train_warmup": 10, "train_batch_size": None, "corpus_images": 128 * 52,
            "switch_steps": 50, "switch_warmup": 10}


def run_part(name: str, ctx: Context, section: Section) -> None:
    from benchmarks.gpu_check_data import run_data
    from benchmarks.gpu_check_switches import run_switches
    from benchmarks.gpu_check_throughput import run_throughput
    from benchmarks.gpu_check_train import run_family

    if name.startswith("train/"):
        run_guarded(section, name, run_family, ctx, section, name.split("/", 1)[1])
    else:
        run_guarded(section, name, {"switches": run_switches, "throughput": run_throughput, "data": run_data}[name],
                    ctx, section)


def in_process(name: str, ctx: Context, path: Path) -> dict:
    section = Section(name, path)
    run_part(name, ctx, section)
    return section.finish()


def isolated(name: str, args, work: Path, budget: float, path: Path) -> dict:
    """The part in a child process (`--only`), killed GRACE_S after its budget; its section file survives."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--only", name, "--work", str(work),
           "--part-budget-s", str(budget), "--section-out", str(path)] + (["--dry-run"] if args.dry_run else [])
    if args.photos:
        cmd += ["--photos", args.photos]
    log = path.with_suffix(".log")
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=budget + GRACE_S).returncode
            killed = None
        except subprocess.TimeoutExpired:
            code, killed = None, f"killed {GRACE_S} s past its {budget:.0f} s budget"
    data = json.loads(path.read_text()) if path.is_file() else {"name": name, "rows": [], "errors": [], "notes": []}
    tail = log.read_text()[-3000:]
    if killed:
        data["errors"].append(f"{name}: {killed}; the rows above are what it finished. Log tail:\n{tail}")
        data["status"] = "failed"
    elif code != 0 and data.get("status") in (None, "running"):
        data["errors"].append(f"{name}: the part's process exited with {code}. Log tail:\n{tail}")
        data["status"] = "failed"
    return data


def environment(device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "load_average": load_average(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": sys.version.split()[0]}


def main_parent(args) -> int:
    import torch

    from benchmarks.gpu_check_corpora import write_demo_corpora
    from benchmarks.gpu_check_report import markdown

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; `make gpu-check ARGS=--dry-run` runs the same code path on the CPU",
              file=sys.stderr)
        return 2
    isolate = (not args.dry_run) if args.isolate is None else args.isolate
    started = time.monotonic()
    deadline = started + args.budget_s
    scale = args.budget_s / 480.0
    parts = [p for p in SHARES if not args.parts or p in args.parts]
    sections = {}
    with tempfile.TemporaryDirectory(prefix="vitx-gpu-check-") as tmp:
        work = Path(tmp)
        write_demo_corpora(work / "corpora", options(args.dry_run)["corpus_images"])  # once, before the parts
        for i, name in enumerate(parts):
            left = deadline - time.monotonic() - 5 * (len(parts) - i - 1)
            budget = max(0.0, min(SHARES[name] * scale, left)) if not args.dry_run else max(0.0, left)
            path = work / f"section-{name.replace('/', '-')}.json"
            print(f"== gpu-check {name}: budget {budget:.0f} s", flush=True)
            if budget < 5:
                sections[name] = {"name": name, "status": "skipped: the total time budget ran out", "rows": [],
                                  "errors": [], "notes": []}
                continue
            if isolate:
                sections[name] = isolated(name, args, work, budget, path)
            else:
                ctx = Context(device, args.dry_run, work, time.monotonic() + budget, options(args.dry_run)
                              | {"photos": args.photos})
                sections[name] = in_process(name, ctx, path)
            print(f"   {name}: {sections[name]['status']} ({sections[name].get('seconds', '-')} s)", flush=True)
    result = {"dry_run": args.dry_run, "budget_s": args.budget_s, "seconds": time.monotonic() - started,
              "isolated_parts": isolate, "environment": environment(device), "options": options(args.dry_run),
              "sections": sections}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("gpu-check-dry" if args.dry_run else "gpu-check")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(not s["status"].startswith("failed") for s in sections.values()) else 1


def main_child(args) -> int:
    """One part in this process (`--only`), as the parent runs it on CUDA."""
    ctx = Context("cpu" if args.dry_run else "cuda", args.dry_run, Path(args.work),
                  time.monotonic() + args.part_budget_s, options(args.dry_run) | {"photos": args.photos})
    data = in_process(args.only, ctx, Path(args.section_out))
    return 0 if not data["status"].startswith("failed") else 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the CPU: tiny sizes, 2 steps, what needs CUDA skipped")
    p.add_argument("--budget-s", type=float, default=480.0, help="total seconds (the parts' shares scale with it)")
    p.add_argument("--parts", default="", help=f"comma-separated subset of: {', '.join(SHARES)}")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each part in its own process (default: on CUDA)")
    p.add_argument("--photos", default=None, help="a .tar of JPEG photos for the data part (default: the "
                                                  "development machines' ImageNet samples if present)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--render", type=Path, default=None, metavar="JSON", help="only rewrite the .md of a saved JSON")
    # the parent's arguments for a part in a child process
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--section-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(args.parts) - set(SHARES)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(SHARES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        from benchmarks.gpu_check_report import markdown

        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    return main_child(args) if args.only else main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
