"""`--ckpt_path`: a checkpoint rebuilds its task from its hyperparameters without re-reading the files its initial
weights came from (issue 14, finding 11), a `--model.*` flag on the command line wins over the checkpoint's value,
and the checkpoint's `_class_path` is checked before anything is imported (finding 13). Through the real `vitx
fit` / `vitx validate` on tiny shards; DeiT's teacher is in tests/tasks/test_distillation.py."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.test_failures import args
from vit_experiments.cli import main


def only(runs: Path, name: str = "last.ckpt") -> Path:
    (path,) = sorted(runs.rglob(name))
    return path


def test_a_fine_tuned_checkpoint_validates_and_resumes_after_its_init_from_moves(tiny_shapes, tmp_path):
    main(args(tiny_shapes, tmp_path / "pre", "--trainer.max_steps", "2"))
    pretrained = tmp_path / "pretrained.ckpt"
    shutil.copy(only(tmp_path / "pre"), pretrained)
    main(args(tiny_shapes, tmp_path / "ft", "--trainer.max_steps", "2", "--model.init_from", str(pretrained)))
    finetuned = tmp_path / "finetuned.ckpt"
    shutil.copy(only(tmp_path / "ft"), finetuned)
    pretrained.unlink()  # the pretrained file moves away

    validate = args(tiny_shapes, tmp_path / "val", "--ckpt_path", str(finetuned))
    main(["validate", *validate[1:]])  # was: FileNotFoundError: checkpoint not found: .../pretrained.ckpt

    main(args(tiny_shapes, tmp_path / "resumed", "--trainer.max_steps", "4", "--ckpt_path", str(finetuned)))
    resumed = torch.load(only(tmp_path / "resumed"), map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4
    assert resumed["hyper_parameters"]["init_from"] == str(pretrained)  # kept as provenance

    # a flag on the command line wins over the checkpoint's hyperparameters
    main(args(tiny_shapes, tmp_path / "nulled", "--trainer.max_steps", "4", "--ckpt_path", str(finetuned),
              "--model.init_from", "null", "--model.optim.lr", "0.000123"))
    nulled = torch.load(only(tmp_path / "nulled"), map_location="cpu", weights_only=True)["hyper_parameters"]
    assert nulled["init_from"] is None and nulled["optim"]["lr"] == pytest.approx(0.000123)


SIDE_EFFECT_MODULE = "vitx_probe_side_effect"


@pytest.fixture
def side_effect_module(tmp_path, monkeypatch) -> Path:
    """A module on sys.path that creates a file when it is imported; returns that file's path."""
    marker = tmp_path / "imported"
    (tmp_path / f"{SIDE_EFFECT_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "import lightning\n"
        "class Task(lightning.LightningModule):\n"
        "    def __init__(self, **kwargs):\n"
        "        super().__init__()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop(SIDE_EFFECT_MODULE, None)


@pytest.mark.parametrize("hparams", [
    {"_class_path": f"{SIDE_EFFECT_MODULE}.Task"},
    {"_class_path": "os.system", "command": "touch {marker}"},
    {"_class_path": "vit_experiments.tasks.classification.ImageClassifier",
     "vit": {"class_path": f"{SIDE_EFFECT_MODULE}.Task"}},
], ids=["side-effect-module", "os.system", "nested"])
def test_a_checkpoint_class_path_is_checked_before_anything_is_imported(hparams, side_effect_module, tiny_shapes,
                                                                        tmp_path, capsys):
    hparams = {k: (v.format(marker=side_effect_module) if isinstance(v, str) else v) for k, v in hparams.items()}
    ckpt = tmp_path / "hostile.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, ckpt)
    validate = args(tiny_shapes, tmp_path / "runs", "--ckpt_path", str(ckpt))
    with pytest.raises(SystemExit, match="refusing --ckpt_path .*--weights_only false"):
        main(["validate", *validate[1:]])
    assert not side_effect_module.exists()
    assert SIDE_EFFECT_MODULE not in sys.modules


def test_a_trusted_checkpoint_may_name_its_own_class(side_effect_module, tiny_shapes, tmp_path):
    """--weights_only false: the user vouches for the file, so its class is imported (and here fails to fit)."""
    ckpt = tmp_path / "own.ckpt"
    torch.save({"hyper_parameters": {"_class_path": f"{SIDE_EFFECT_MODULE}.Task"}, "state_dict": {}}, ckpt)
    validate = args(tiny_shapes, tmp_path / "runs", "--ckpt_path", str(ckpt), "--weights_only", "false")
    with pytest.raises(BaseException):
        main(["validate", *validate[1:]])
    assert side_effect_module.exists()
