"""`vitx`: the command line.

    vitx fit|validate|test|predict --config conf/vit/pretrain.yaml [--config overlay.yaml] [--model.optim.lr 5e-4]
    vitx data synth|from-folder|...   write and inspect WebDataset shards
    vitx analyze --ckpt RUN/checkpoints/last.ckpt --images DIR|SHARDS --out OUT

The training verbs are Lightning's LightningCLI over the typed signatures of the tasks and datamodules: every
argument of a task, a datamodule or the Trainer is a config key and a command-line flag, OmegaConf
interpolation (`${model.init_args.vit.image_size}`) works across the stacked YAML files, and an unknown key is an error before
anything runs. The resolved config is saved beside the run's TensorBoard events as config.yaml.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from typing import Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning.pytorch.cli import LightningCLI

TRAINING_VERBS = ("fit", "validate", "test", "predict")

# Lightning warnings about choices vitx makes on purpose; each would otherwise print in every run.
INTENDED = (
    # the tasks normalise and augment batches on the accelerator in on_after_batch_transfer, with any datamodule
    r".*overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    # ImageThroughput logs images/s; model FLOPs utilisation is measured by `make bench`
    r".*`ThroughputMonitor`, you need to define a `flops_per_batch`",
)

USAGE = """usage: vitx {fit,validate,test,predict,data,analyze} ...

  fit|validate|test|predict   train or evaluate (LightningCLI): vitx fit --config conf/vit/pretrain.yaml
  data                        write or inspect shards: vitx data --help
  analyze                     attention distance, position similarity, rollout for a checkpoint: vitx analyze --help
"""


class VitxCLI(LightningCLI):
    """LightningCLI with OmegaConf-parsed configs and the resolved config saved in every run directory."""

    def __init__(self, args: Optional[list[str]] = None) -> None:
        parser_kwargs = {verb: {"parser_mode": "omegaconf"} for verb in TRAINING_VERBS}
        super().__init__(
            model_class=None,  # any LightningModule, chosen by class_path in the config
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs=parser_kwargs,
            save_config_kwargs={"overwrite": True},
            args=args,
        )


def resolve_config_files(argv: list[str]) -> list[str]:
    """Merge the `--config` files of `argv` with OmegaConf and resolve their interpolations, so that a value in
    one file (`${model.init_args.vit.image_size}`) can feed a field of any other. The merged, resolved config
    replaces the files, at the place of the first one; flags after it still override single fields.

    jsonargparse validates each class's init_args before its own OmegaConf pass would run, so interpolations
    into typed fields are resolved here, first."""
    paths, rest, first = [], [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
            i += 2
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
            i += 1
        else:
            rest.append(arg)
            i += 1
            continue
        first = len(rest) if first is None else first
    texts = [open(p).read() for p in paths]
    if not any("${" in t for t in texts):
        return argv
    merged = OmegaConf.create({})
    for path in paths:
        merged = OmegaConf.merge(merged, fold_appends(merged, OmegaConf.load(path)))
    resolved = OmegaConf.to_yaml(merged, resolve=True)
    out = tempfile.NamedTemporaryFile("w", prefix="vitx-config-", suffix=".yaml", delete=False)
    out.write(f"# merged and resolved from: {' '.join(paths)}\n{resolved}")
    out.close()
    return rest[:first] + ["--config", out.name] + rest[first:]


def fold_appends(base: DictConfig, cfg: DictConfig) -> DictConfig:
    """A later file's `key+: [...]` (jsonargparse's list append, e.g. `trainer.callbacks+` in an overlay)
    extended by the list that the earlier files gave `key`: OmegaConf's merge would otherwise keep both keys, and
    jsonargparse would then replace the list instead of appending to it."""
    for key in list(cfg.keys()):
        value = cfg[key]
        name = str(key)[:-1]
        if str(key).endswith("+") and isinstance(base.get(name), ListConfig):
            added = OmegaConf.to_container(value) if isinstance(value, ListConfig) else [value]
            cfg[name] = OmegaConf.to_container(base[name]) + added  # interpolations kept, resolved later
            del cfg[key]
        elif isinstance(value, DictConfig) and isinstance(base.get(key), DictConfig):
            fold_appends(base[key], value)
    return cfg


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv else None
    if verb == "data":
        from data_pipelines.cli import main_data

        sys.exit(main_data(argv[1:]))
    if verb == "analyze":
        from vit_experiments.analyze import main_analyze

        sys.exit(main_analyze(argv[1:]))
    if verb in (None, "help") or (verb not in TRAINING_VERBS and not verb.startswith("-")):
        print(USAGE, file=sys.stderr)
        sys.exit(0 if verb in (None, "help") else 2)
    for message in INTENDED:
        warnings.filterwarnings("ignore", message=message)
    VitxCLI(args=resolve_config_files(argv))


if __name__ == "__main__":
    main()
