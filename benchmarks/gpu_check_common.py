"""What the parts of `make gpu-check` share: the run context (device, dry mode, time budget, work folder), the
section each part fills (flushed to disk after every row, so that a part killed at its budget keeps what it
measured), and `vitx` run in this process."""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TRAINER = CONF / "trainer"
NEEDS_CUDA = "skipped: needs CUDA"
OVER_BUDGET = "skipped: over the part's time budget"


@dataclass
class Context:
    """Where a part runs: `device` is "cuda" or "cpu" (the dry run); `deadline` is time.monotonic() by which the
    part must be done; `work` holds the corpora and runs of this invocation."""

    device: str
    dry: bool
    work: Path
    deadline: float
    options: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Section:
    """One part's result: rows (one per run or model), errors, and a status derived from them:
    "passed" when no row failed (skipped rows say why they were skipped), else "failed"."""

    def __init__(self, name: str, path: Optional[Path] = None) -> None:
        self.name, self.path = name, path
        self.data: dict[str, Any] = {"name": name, "status": "running", "rows": [], "errors": [], "notes": []}
        self.started = time.monotonic()

    def row(self, **row: Any) -> dict:
        self.data["rows"].append(row)
        self.flush()
        return row

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def error(self, text: str) -> None:
        self.data["errors"].append(text[-4000:])
        self.flush()

    def finish(self) -> dict:
        rows = self.data["rows"]
        failed = self.data["errors"] or any(str(r.get("status", "")).startswith("failed") for r in rows)
        if failed:
            self.data["status"] = "failed"
        elif any(str(r.get("status", "")).startswith(OVER_BUDGET) for r in rows):
            self.data["status"] = "partial: the part's time budget ran out before some of its runs"
        elif rows and all(str(r.get("status", "")).startswith("skipped") for r in rows):
            self.data["status"] = "skipped: " + "; ".join(sorted({r["status"][len("skipped: "):] for r in rows}))
        else:
            self.data["status"] = "passed"
        self.data["seconds"] = round(time.monotonic() - self.started, 1)
        self.flush()
        return self.data

    def flush(self) -> None:
        self.data["seconds"] = round(time.monotonic() - self.started, 1)
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=1, default=str))


def run_guarded(section: Section, what: str, fn, *args, **kwargs) -> Any:
    """fn(*args, **kwargs), with any exception recorded in the section instead of raised: one failure never
    stops the rest of the check."""
    try:
        return fn(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001 - reported; KeyboardInterrupt still stops the whole check
        if isinstance(err, KeyboardInterrupt):
            raise
        section.error(f"{what}: {type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}")
        return None


def vitx(argv: Sequence[str]) -> None:
    """`vitx ARGV` in this process, as a user would run it; a non-zero exit raises with the command."""
    from vit_experiments.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"`vitx {' '.join(map(str, argv))}` exited with {exit_.code}") from None


def accelerator_args(ctx: Context, runs: Path) -> list[str]:
    return ["--trainer.accelerator", "gpu" if ctx.cuda else "cpu", "--trainer.devices", "1",
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0"]


def load_average() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
