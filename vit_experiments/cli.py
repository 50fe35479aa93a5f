"""`vitx`: the command line.

    vitx fit|validate|test|predict --config conf/vit/pretrain.yaml [--config overlay.yaml] [--model.optim.lr 5e-4]
    vitx data synth|from-folder|...   write and inspect WebDataset shards
    vitx analyze --ckpt RUN/checkpoints/last.ckpt --images DIR|SHARDS --out OUT

The training verbs are Lightning's LightningCLI over the typed signatures of the tasks and datamodules: every
argument of a task, a datamodule or the Trainer is a config key and a command-line flag, and an unknown key is an
error before anything runs. Config files are read in jsonargparse's `omegaconf+` mode: interpolations
(`${model.init_args.vit.image_size}`) are resolved once, over the config that the stacked files and the flags
make together, so a flag reaches every field that refers to it. The resolved config is saved beside the run's
TensorBoard events as config.yaml.

Beyond LightningCLI, vitx resolves what the data knows: a classifier whose `num_classes` is unset takes it from
the shards' classes.json. A ViT `variant` given on the command line replaces the dimensions a config file set.
Every checkpoint is loaded with `weights_only=True` unless `--weights_only false` says the file is trusted.
"""

from __future__ import annotations

import glob
import os
import shlex
import stat
import sys
import warnings
from typing import Any, Optional

from jsonargparse import Namespace, set_docstring_parse_options, set_parsing_settings
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

TRAINING_VERBS = ("fit", "validate", "test", "predict")
# the dimensions a ViT variant sets (models.vit.VARIANTS, plus the patch size of "B/16")
VARIANT_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim")

# Lightning warnings about choices vitx makes on purpose; each would otherwise print in every run.
INTENDED = (
    # the tasks normalise and augment batches on the accelerator in on_after_batch_transfer, with any datamodule
    r".*overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    # ImageThroughput logs images/s; model FLOPs utilisation is measured by `make bench`
    r".*`ThroughputMonitor`, you need to define a `flops_per_batch`",
    # the stream's __len__ is exact per worker: the planner gives every worker its own share of every epoch
    r".*Your `IterableDataset` has `__len__` defined",
    # raised inside Lightning's own code under torch >= 2.10, nothing a vitx user can change
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
)

USAGE = """usage: vitx {fit,validate,test,predict,data,analyze} ...

  fit                 train: vitx fit --config conf/vit/pretrain.yaml [--config conf/trainer/ddp.yaml] [--model.optim.lr 5e-4]
  validate|test       evaluate a checkpoint: vitx validate --config conf/vit/pretrain.yaml --ckpt_path RUN/checkpoints/last.ckpt
  predict             predictions of a checkpoint on the data module's predict set
  data                write or inspect shards: vitx data --help
  analyze             attention distance, position similarity, rollout, filters of a checkpoint: vitx analyze --help

  vitx fit --help lists every option of the trainer, the model and the data (add --model.help CLASS for a task's).
"""


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


def _flag_paths(argv: list[str]) -> set[str]:
    """Dotted keys given as command-line flags, without LightningCLI's `init_args` level."""
    keys = set()
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("--config"):
            keys.add(arg[2:].split("=", 1)[0].replace(".init_args.", "."))
    return keys


def _vit_nodes(node: Any, path: str = "") -> list[tuple[str, Namespace]]:
    """(dotted path without init_args, namespace) of every ViT configuration under `node`."""
    found = []
    if isinstance(node, Namespace):
        children = {key: node[key] for key in vars(node)}  # direct children only
        if {"variant", "patch_size", "embed_dim", "image_size"} <= set(children):
            found.append((path, node))
        for key, child in children.items():
            if isinstance(child, Namespace):
                found += _vit_nodes(child, path if key == "init_args" else f"{path}.{key}".lstrip("."))
    return found


class VitxCLI(LightningCLI):
    """LightningCLI in omegaconf+ mode, with what the data knows filled in (see the module docstring)."""

    def __init__(self, args: Optional[list[str]] = None) -> None:
        """args: the command line after `vitx`; None reads sys.argv (LightningCLI warns when given both)."""
        self.argv, self.piped = inline_piped_configs(list(sys.argv[1:] if args is None else args))
        if args is None:
            sys.argv[1:] = self.argv  # what a DDP launcher runs again in each new process
        else:
            args = self.argv
        # interpolations in files are written from the root (`${model.init_args...}`); jsonargparse resolves them
        # per subcommand, so they are made relative to where they stand
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        # the config dataclasses document each field in a docstring below it: that is the flag's help text
        set_docstring_parse_options(attribute_docstrings=True)
        super().__init__(
            model_class=None,  # any LightningModule, chosen by class_path in the config
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_kwargs={"overwrite": True},
            args=args,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True  # Lightning's default for a remote --ckpt_path would unpickle anything
        if config.get("ckpt_path") == "last":
            self._resolve_last(config)
        model = config.get("model")
        if isinstance(model, Namespace):
            self._variant_from_command_line(model)
            self._num_classes_from_data(model, config.get("data"))

    def _resolve_last(self, config: Namespace) -> None:
        """`--ckpt_path last`: the newest checkpoint of any version of this experiment's run directory (a resumed,
        pre-empted or requeued job logs into that version again), or a fresh start when there is none yet."""
        logger = (config.get("trainer") or {}).get("logger")
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if not isinstance(init, Namespace) or init.get("save_dir") is None:
            return  # no run directory to search: Lightning resolves "last" among its own callbacks' folders
        root = os.path.join(str(init["save_dir"]), str(init.get("name") or "lightning_logs"))
        found = [p for pattern in ("version_*/checkpoints/*.ckpt", "version_*/hpc_ckpt_*.ckpt")
                 for p in glob.glob(os.path.join(root, pattern))]
        if not found:
            print(f"vitx: --ckpt_path last: no checkpoint under {root} yet; starting from scratch", file=sys.stderr)
            config["ckpt_path"] = None
            return
        newest = max(found, key=os.path.getmtime)
        config["ckpt_path"] = newest
        version = os.path.relpath(newest, root).split(os.sep)[0]
        if "version" in init and init.get("version") is None:
            init["version"] = version  # keep logging into the run that is being resumed
        print(f"vitx: --ckpt_path last: resuming from {newest}", file=sys.stderr)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        """Every run gets the run guards (vit_experiments.callbacks): atomic checkpoint writes, a non-finite loss
        that stops the run on every rank, a fit that trained nothing failing, a checkpoint and a resume command on
        SIGTERM, Ctrl-C and exceptions. A config that sets one of them itself keeps its own settings."""
        from lightning.fabric.plugins import CheckpointIO

        from vit_experiments.callbacks.checkpointing import AtomicCheckpointIO
        from vit_experiments.callbacks.interruption import InterruptCheckpoint
        from vit_experiments.callbacks.run_guard import NonFiniteGuard, RequireProgress

        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = config.get("strategy")
        own_io = getattr(strategy, "_checkpoint_io", None) is not None
        if not own_io and not any(isinstance(p, CheckpointIO) for p in plugins):
            trusted = self.config[self.subcommand].get("weights_only") is False
            plugins.append(AtomicCheckpointIO(trusted=trusted))
        config["plugins"] = plugins or None
        given = list(config.get("callbacks") or []) + list(callbacks)
        interrupt = InterruptCheckpoint(resume_command=self._resume_command())
        guards = [NonFiniteGuard(), RequireProgress(), interrupt]
        extra = [g for g in guards if not any(isinstance(c, type(g)) for c in given)]
        if self.piped and interrupt in extra:
            extra.append(_ResumeWithSavedConfig(interrupt, self._resume_command))
        return super()._instantiate_trainer(config, list(callbacks) + extra)

    def _resume_command(self, saved_config: Optional[str] = None) -> str:
        """The command line without its --ckpt_path; a piped config, gone once read, replaced by the run's saved
        config.yaml (the whole resolved config: what comes after it on the command line still applies on top)."""
        args, skip = [], False
        for i, arg in enumerate(self.argv):
            if i in self.piped:
                arg = saved_config or self.piped[i]
                arg = "--config=" + arg if self.argv[i].startswith("--config=") else arg
            if skip:
                skip = False
            elif arg == "--ckpt_path":
                skip = True
            elif not arg.startswith("--ckpt_path="):
                args.append(arg)
        return "vitx " + " ".join(shlex.quote(a) for a in args)

    def _variant_from_command_line(self, model: Namespace) -> None:
        flags = _flag_paths(self.argv)
        for path, vit in _vit_nodes(model, "model"):
            if f"{path}.variant" not in flags or vit.get("variant") is None:
                continue
            replaced = {f: vit[f] for f in VARIANT_FIELDS if vit.get(f) is not None and f"{path}.{f}" not in flags}
            for f in replaced:
                vit[f] = None
            if replaced:
                print(f"vitx: {path}.variant {vit['variant']} from the command line replaces "
                      f"{', '.join(f'{k} {v}' for k, v in replaced.items())} set by the config", file=sys.stderr)

    def _num_classes_from_data(self, model: Namespace, data: Any) -> None:
        init = model.get("init_args")
        if not isinstance(init, Namespace):
            return
        unset = [key for key in ("vit", "resnet") if isinstance(init.get(key), Namespace)
                 and "num_classes" in init[key] and init[key]["num_classes"] is None]
        if not unset:
            return
        names = _class_names(data)
        if names is None:
            raise SystemExit(
                f"vitx: model.{unset[0]}.num_classes is not set and the data names no classes (no classes.json "
                f"beside the shards): set --model.{unset[0]}.num_classes N")
        for key in unset:
            init[key]["num_classes"] = len(names)


class _ResumeWithSavedConfig(Callback):
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


def _class_names(data: Any) -> Optional[list[str]]:
    """The class names of the data's training (else validation) shards, from the classes.json beside them."""
    from data_pipelines.metadata import read_classes
    from data_pipelines.urls import expand_urls

    init = data.get("init_args") if isinstance(data, Namespace) else None
    if not isinstance(init, Namespace):
        return None
    for key in ("train_shards", "val_shards"):
        pattern = init.get(key)
        if not pattern:
            continue
        try:
            names = read_classes(expand_urls(pattern))
        except (ValueError, FileNotFoundError, OSError):
            names = None  # not written yet (synthesize_if_missing) or remote: the data module decides later
        if names:
            return names
        if init.get("synthesize_if_missing"):
            from data_pipelines.synthetic import CLASS_NAMES

            return list(CLASS_NAMES)
    return None


def main(argv: Optional[list[str]] = None) -> None:
    from_python = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv else None
    if verb == "data":
        from data_pipelines.cli import main_data

        sys.exit(main_data(argv[1:]))
    if verb == "analyze":
        from vit_experiments.analyze import main_analyze

        sys.exit(main_analyze(argv[1:]))
    if verb in (None, "help", "-h", "--help") or verb not in TRAINING_VERBS:
        print(USAGE, file=sys.stdout if verb in ("-h", "--help", "help") else sys.stderr)
        sys.exit(0 if verb in (None, "help", "-h", "--help") else 2)
    for message in INTENDED:
        warnings.filterwarnings("ignore", message=message)
    VitxCLI(args=argv if from_python else None)


if __name__ == "__main__":
    main()
