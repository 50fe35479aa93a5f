"""`vitx`: the command line.

    vitx fit|validate|test|predict --config conf/vit/pretrain.yaml [--config overlay.yaml] [--model.optim.lr 5e-4]
    vitx data synth|from-folder|...   write and inspect WebDataset shards
    vitx analyze --ckpt RUN/checkpoints/last.ckpt --images DIR|SHARDS --out OUT
    vitx export --ckpt RUN/checkpoints/last.ckpt --format timm|hf|open_clip --out PATH

The training verbs are Lightning's LightningCLI over the typed signatures of the tasks and datamodules: every
argument of a task, a datamodule or the Trainer is a config key and a command-line flag, and an unknown key is an
error before anything runs. Config files are read in jsonargparse's `omegaconf+` mode: interpolations
(`${model.init_args.vit.image_size}`) are resolved once, over the config that the stacked files and the flags
make together, so a flag reaches every field that refers to it. The resolved config is saved beside the run's
TensorBoard events as config.yaml.

Beyond LightningCLI, vitx resolves what the data knows: a classifier whose `num_classes` is unset takes it from
the shards' classes.json. A ViT `variant` given on the command line replaces the dimensions a config file set.
Every checkpoint is loaded with `weights_only=True` unless `--weights_only false` says the file is trusted.

`--ckpt_path`: as in LightningCLI, the task is rebuilt from the checkpoint's hyperparameters (its `_class_path` and
arguments), which replace the config's; here a `--model.*` flag on the command line still wins over them
(`--model.teacher_ckpt NEW/PATH`, `--model.init_from null`), and the `_class_path` is checked before anything is
imported: a vitx task (a LightningModule under vit_experiments.tasks.) or the config's own model class_path, unless
`--weights_only false` trusts the file. The task is built `restoring` (vit_experiments.tasks.core): the files its
initial weights would come from (`init_from`) are not read, since the checkpoint's weights replace them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shlex
import sys
import warnings
from typing import Any, Optional

from vit_experiments import threads

# before anything imports torch: the OpenMP runtime reads its wait policy once, when torch loads it
threads.configure()

from jsonargparse import Namespace, set_docstring_parse_options, set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningCLI

from vit_experiments.cli_inputs import (
    ResumeWithSavedConfig,
    check_class_paths,
    inline_piped_configs,
    raised_by_a_class,
)

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

USAGE = """usage: vitx {fit,validate,test,predict,data,analyze,zeroshot,export} ...

  fit                 train: vitx fit --config conf/vit/pretrain.yaml [--config conf/trainer/ddp.yaml] [--model.optim.lr 5e-4]
  validate|test       evaluate a checkpoint: vitx validate --config conf/vit/pretrain.yaml --ckpt_path RUN/checkpoints/last.ckpt
  predict             predictions of a checkpoint on the data module's predict set
  data                write or inspect shards: vitx data --help
  analyze             attention distance, position similarity, rollout, filters of a checkpoint: vitx analyze --help
  zeroshot            zero-shot accuracy and retrieval of a CLIP checkpoint on a class folder or shards: vitx zeroshot --help
  export              a ViT/DeiT checkpoint in timm's or Hugging Face's layout, a CLIP in Hugging Face's or
                      open_clip's: vitx export --help

  vitx fit --help lists every option of the trainer, the model and the data (add --model.help CLASS for a task's).
"""


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

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's rebuilding of the model from `--ckpt_path`'s hyperparameters, with what the module
        docstring says vitx adds."""
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        if config.get("ckpt_path") == "last":
            self._resolve_last(config)
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not os.path.isfile(str(ckpt_path)):
            return  # a remote checkpoint: the config builds the model, as in Lightning
        from vit_experiments.checkpoints.io import load_file

        trusted = config.get("weights_only") is False
        try:
            ckpt = load_file(str(ckpt_path), trust=trusted)
        except ValueError as err:
            raise SystemExit(f"vitx: --ckpt_path: {err}") from err
        hparams = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None)
        if not trusted:
            check_class_paths(str(ckpt_path), class_path, hparams, config.get("model"))
        self._command_line_wins(hparams, config.get("model"))
        model = {"class_path": class_path, "dict_kwargs": hparams} if class_path else hparams
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def _command_line_wins(self, hparams: dict, model: Any) -> None:
        """A `--model.*` flag given on the command line replaces the checkpoint's value of that argument."""
        init = model.get("init_args") if isinstance(model, Namespace) else None
        if not isinstance(init, Namespace):
            return
        for flag in sorted(_flag_paths(self.argv)):
            keys = flag.split(".")
            if keys[0] != "model" or len(keys) < 2 or keys[1] not in hparams:
                continue
            value = init.get(".".join(keys[1:]))
            node = hparams
            for key in keys[1:-1]:
                if not isinstance(node.get(key), dict):
                    break
                node = node[key]
            else:
                node[keys[-1]] = value.as_dict() if isinstance(value, Namespace) else value

    def instantiate_classes(self) -> None:
        """Built for a `--ckpt_path`, the task is `restoring`: it does not read its initial weights' files."""
        from vit_experiments.tasks.core import restoring

        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        with restoring(self.subcommand) if ckpt_path else contextlib.nullcontext():
            try:
                super().instantiate_classes()
            except ValueError as err:
                cause = raised_by_a_class(err)
                if cause is None:
                    raise
                raise cause from None  # the task's own error, not jsonargparse's dump of every Union member

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True  # Lightning's default for a remote --ckpt_path would unpickle anything
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

        from vit_experiments.callbacks.analysis import AttentionAnalysis
        from vit_experiments.callbacks.checkpointing import AtomicCheckpointIO
        from vit_experiments.callbacks.dashboard import run_callbacks
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
        if interrupt in extra:
            # first of all callbacks: on an interruption the checkpoint is written before any other callback's
            # end-of-run work (the final analysis), within a scheduler's grace period after SIGTERM
            extra.remove(interrupt)
            own = config.get("callbacks")
            config["callbacks"] = [interrupt] + (list(own) if isinstance(own, (list, tuple)) else [own] if own else [])
            if self.piped:
                extra.append(ResumeWithSavedConfig(interrupt, self._resume_command))
        extra += run_callbacks(config, given)  # dashboard, images/s progress bar, model summary
        own = [c for c in config.get("callbacks") or [] if isinstance(c, AttentionAnalysis)]
        if own:  # an older config lists the analysis among its callbacks: that one runs, the `analysis:` group not
            callbacks = [c for c in callbacks if not isinstance(c, AttentionAnalysis) or c in own]
        return super()._instantiate_trainer(config, list(callbacks) + extra)

    def add_arguments_to_parser(self, parser) -> None:
        """`analysis:` (--analysis.every_n_steps 10, --analysis.num_images 4, --analysis.enabled false): the
        attention analysis of every run, a group of its own rather than an entry of trainer.callbacks, whose
        list a flag cannot reach into."""
        from vit_experiments.callbacks.analysis import AttentionAnalysis

        parser.add_lightning_class_args(AttentionAnalysis, "analysis")

    def _resume_command(self, saved_config: Optional[str] = None) -> str:
        """The command line without its --ckpt_path; a piped config, gone once read, replaced by the run's saved
        config.yaml (the whole resolved config: what comes after it on the command line still applies on top)."""
        from vit_experiments.callbacks.interruption import without_ckpt_path

        argv = list(self.argv)
        for i in self.piped:
            arg = saved_config or self.piped[i]
            argv[i] = "--config=" + arg if self.argv[i].startswith("--config=") else arg
        return "vitx " + " ".join(shlex.quote(a) for a in without_ckpt_path(argv))

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
    if verb == "zeroshot":
        from vit_experiments.zeroshot import main_zeroshot

        sys.exit(main_zeroshot(argv[1:]))
    if verb == "export":
        from vit_experiments.export import main_export

        sys.exit(main_export(argv[1:]))
    if verb in (None, "help", "-h", "--help") or verb not in TRAINING_VERBS:
        print(USAGE, file=sys.stdout if verb in ("-h", "--help", "help") else sys.stderr)
        sys.exit(0 if verb in (None, "help", "-h", "--help") else 2)
    for message in INTENDED:
        warnings.filterwarnings("ignore", message=message)
    VitxCLI(args=argv if from_python else None)


if __name__ == "__main__":
    main()
