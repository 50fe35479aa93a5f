"""The 2-process half of test_overlays.py: several `vitx` commands, one after the other, in one set of processes
started by torchrun, so that the start-up (imports, process group) is paid once per overlay:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.matrix._worker JOBS.json

JOBS.json is a list of {"name": ..., "argv": [...]}; each process writes the outcome of each job beside JOBS.json
as <name>.rank<R>.json: {"ok": true} or {"ok": false, "error": "Type: message", "traceback": ...}. A job that fails does not stop the
next one.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch


def main(jobs_file: str) -> None:
    from tests.matrix._runs import vitx

    torch.set_num_threads(1)
    folder, rank = Path(jobs_file).parent, os.environ.get("RANK", "0")
    for job in json.loads(Path(jobs_file).read_text()):
        try:
            vitx(job["argv"])
            outcome = {"ok": True}
        except BaseException as err:  # noqa: BLE001 - reported to the test of this job, the next job still runs
            outcome = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                       "traceback": traceback.format_exc()[-6000:]}
        (folder / f"{job['name']}.rank{rank}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1])
