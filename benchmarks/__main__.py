"""Run the benchmarks: `make bench`, or

    python -m benchmarks                      # every benchmark, default settings
    python -m benchmarks throughput [ARGS]    # training images/s and MFU of vitx vs reference ViTs/CLIPs
    python -m benchmarks data [ARGS]          # data-loading images/s per core vs a naive webdataset pipeline
    python -m benchmarks cpu_threads [ARGS]   # vitx fit's images/s, torch's threads vs vitx's, idle and beside busy jobs
    python -m benchmarks gpu-check [ARGS]     # make gpu-check (not run by a plain `python -m benchmarks`)
    python -m benchmarks contrastive-accum    # CLIP step memory/time: one batch, feature-cached accumulation, 2 ranks
    python -m benchmarks --list

ARGS go to the benchmark (`python -m benchmarks throughput --help`). Each writes its figures to
benchmarks/results/. A benchmark whose module is not present in this checkout is skipped with a note.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback

# name -> module with a main(argv) function
BENCHMARKS = {
    "throughput": "benchmarks.throughput",
    "data": "benchmarks.data_throughput",
    "contrastive-accum": "benchmarks.contrastive_accumulation",
    "cpu_threads": "benchmarks.cpu_threads",
    "gpu-check": "benchmarks.gpu_check",
}
# run only when named: `make gpu-check` is its own verb (it needs a GPU, or --dry-run)
ON_REQUEST = {"gpu-check"}


def available() -> dict[str, str]:
    return {name: mod for name, mod in BENCHMARKS.items() if importlib.util.find_spec(mod) is not None}


def run(name: str, argv: list[str]) -> None:
    code = importlib.import_module(BENCHMARKS[name]).main(argv)
    if isinstance(code, int) and code:  # a benchmark that reports failure by its return value
        raise SystemExit(code)


def main(argv: list[str]) -> int:
    found = available()
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "--list":
        for name, mod in BENCHMARKS.items():
            print(f"{name:12s} {mod}{'' if name in found else '  (not in this checkout)'}")
        return 0
    if argv and not argv[0].startswith("-"):
        name = argv[0]
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        if name not in found:
            print(f"benchmark {name!r} ({BENCHMARKS[name]}) is not in this checkout", file=sys.stderr)
            return 2
        run(name, argv[1:])
        return 0
    if argv:
        print(f"options need a benchmark name first, e.g. `python -m benchmarks throughput {' '.join(argv)}`",
              file=sys.stderr)
        return 2
    failed = []
    for name in BENCHMARKS:
        if name in ON_REQUEST:
            continue
        if name not in found:
            print(f"== {name}: not in this checkout, skipped")
            continue
        print(f"== {name}", flush=True)
        try:
            run(name, [])
        except SystemExit as e:  # argparse errors and explicit exits
            if e.code not in (0, None):
                failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
