"""What the `vitx` command line is given, checked before it is used: `--config` files that can be read only once
(pipes), and the hyperparameters of a `--ckpt_path` checkpoint, whose class paths are checked before jsonargparse
imports them (issue 14, finding 13)."""

from __future__ import annotations

import importlib
import os
import re
import stat
import traceback
from typing import Any, Optional

from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback

# -- --config files that can be read once ----------------------------------------------------------------------------

# paths that mean something only in the process that opened them: `<(...)` in bash is /dev/fd/N
PROCESS_LOCAL = ("/dev/fd/", "/proc/self/fd/", "/dev/stdin")


def _is_piped(path: str) -> bool:
    """A --config value that can be read once, by this process only: a pipe, a FIFO, a terminal, a descriptor."""
    if path.startswith(PROCESS_LOCAL):
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode) and not stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False  # not a path (a YAML string), or missing: jsonargparse says so


def inline_piped_configs(argv: list[str]) -> tuple[list[str], dict[int, str]]:
    """`--config <(...)`, /dev/stdin, a FIFO: read each once, here, and put its content in its place (jsonargparse
    takes a YAML string for --config), so that every later reader sees it — a DDP launcher re-running the command
    line in new processes, which have no such descriptor, included. Returns (argv, {index: original path})."""
    out, piped = list(argv), {}
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            at, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--config="):
            at, value, prefix = i, arg.split("=", 1)[1], "--config="
        else:
            continue
        if at in piped or not _is_piped(value):
            continue
        with open(value, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise SystemExit(f"vitx: --config {value} is empty (a pipe read twice, or a command that wrote nothing)")
        out[at], piped[at] = prefix + text, value
    return out, piped


class ResumeWithSavedConfig(Callback):
    """Makes the interruption message name the run's config.yaml in place of a piped --config."""

    def __init__(self, interrupt: Any, render: Any) -> None:
        self.interrupt, self.render = interrupt, render

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # the logger's own log_dir, not trainer.log_dir: that one is a broadcast, and only the process that read the
        # pipe has this callback (the processes a DDP launcher starts get the content, not the pipe)
        if stage == "fit":
            log_dir = trainer.logger.log_dir if trainer.logger is not None else None
            self.interrupt.resume_command = self.render(os.path.join(log_dir or trainer.default_root_dir,
                                                                     "config.yaml"))


# -- the hyperparameters of a --ckpt_path checkpoint ------------------------------------------------------------------

def check_class_paths(ckpt_path: str, class_path: Any, hparams: dict, model: Any) -> None:
    """Every class a checkpoint's hyperparameters name, before anything is imported: the task must be a vitx
    task or the class the user's config names; nothing nested in the arguments may name a class."""
    given = model.get("class_path") if isinstance(model, Namespace) else None
    if class_path is not None and class_path != given and not is_vitx_task(class_path):
        raise SystemExit(
            f"vitx: refusing --ckpt_path {ckpt_path}: its hyper_parameters name the class {class_path!r}, which is "
            f"neither a vitx task (a LightningModule under vit_experiments.tasks.) nor the model class_path of "
            f"the config ({given}), and building it would import and run code the file chose. If you trust the "
            "file, pass --weights_only false.")
    nested = nested_class_paths(hparams)
    if nested:
        raise SystemExit(
            f"vitx: refusing --ckpt_path {ckpt_path}: its hyper_parameters name classes to build in the task's "
            f"arguments ({', '.join(map(repr, nested))}); vitx tasks take plain values only. If you trust the "
            "file, pass --weights_only false.")


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
TASKS_PACKAGE = "vit_experiments.tasks."


def is_vitx_task(class_path: Any) -> bool:
    """`class_path` names a LightningModule class defined in a module under vit_experiments.tasks (only vitx's own
    modules are imported to find out)."""
    if not isinstance(class_path, str) or not _DOTTED.fullmatch(class_path) or not class_path.startswith(TASKS_PACKAGE):
        return False
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    from lightning.pytorch import LightningModule

    cls = getattr(module, name, None)
    return (isinstance(cls, type) and issubclass(cls, LightningModule)
            and cls.__module__ == module_name and module_name.startswith(TASKS_PACKAGE))


def raised_by_a_class(err: BaseException) -> Optional[BaseException]:
    """The error a class's __init__ raised, when jsonargparse wrapped it while instantiating; else None."""
    cause = err
    while cause.__cause__ is not None and _from_jsonargparse(cause):
        cause = cause.__cause__
    return None if cause is err or _from_jsonargparse(cause) else cause


def _from_jsonargparse(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename


def nested_class_paths(value: Any) -> list[str]:
    """The class paths a structure of hyperparameters names (jsonargparse would import and build each)."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("class_path", "_class_path"):
                found.append(str(item))
            found += nested_class_paths(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += nested_class_paths(item)
    return found
