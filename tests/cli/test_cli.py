"""What vitx adds to LightningCLI: interpolation that sees command-line flags (and leaves no files behind), the
label set taken from the data, a command-line variant that wins over a config's dimensions, every verb in
--help, and checkpoints loaded with weights_only=True whatever their scheme."""

from __future__ import annotations

import functools
import http.server
import os
import pickle
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from vit_experiments.cli import main

PRETRAIN = str(REPO / "conf" / "vit" / "pretrain.yaml")
CIFAR10 = str(REPO / "conf" / "vit" / "cifar10.yaml")


def printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_a_flag_reaches_the_fields_that_interpolate_it_and_no_file_is_left(capsys):
    before = set(os.listdir(tempfile.gettempdir()))
    config = printed_config(capsys, "--config", PRETRAIN, "--model.init_args.vit.image_size", "48")
    assert config["model"]["init_args"]["vit"]["image_size"] == 48
    assert config["data"]["init_args"]["image_size"] == 48  # data.image_size: ${model.init_args.vit.image_size}
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("vitx-config")]


def test_overlay_lists_append_to_the_experiments(capsys):
    config = printed_config(capsys, "--config", PRETRAIN, "--config",
                            str(REPO / "conf" / "trainer" / "activation_checkpointing.yaml"))
    classes = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"]["callbacks"]]
    assert classes[0] == "ModelCheckpoint" and classes[-1] == "ActivationCheckpointing"


def fit_one_step(shapes: Path, runs: Path, *extra: str, config: str = PRETRAIN) -> Path:
    main(["fit", "--config", config,
          "--data.train_shards", str(shapes / "train-{000000..000003}.tar"),
          "--data.val_shards", str(shapes / "val-000000.tar"), "--data.synthesize_if_missing", "false",
          "--data.batch_size", "8", "--data.num_workers", "0", "--trainer.logger.init_args.save_dir", str(runs),
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "1",
          "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", *extra])
    (ckpt,) = runs.glob("*/version_*/checkpoints/last.ckpt")
    return ckpt


def test_num_classes_and_class_names_come_from_the_data(tiny_shapes, tmp_path):
    import torch

    from data_pipelines.metadata import read_classes
    from data_pipelines.urls import expand_urls

    tiny = ["--model.vit.image_size", "16", "--model.vit.embed_dim", "16", "--model.vit.depth", "1",
            "--model.vit.num_heads", "2", "--model.vit.mlp_dim", "32"]
    ckpt = torch.load(fit_one_step(tiny_shapes, tmp_path, *tiny), map_location="cpu", weights_only=True)
    names = read_classes(expand_urls(str(tiny_shapes / "val-000000.tar")))
    assert ckpt["vitx"]["network"]["num_classes"] == len(names) == 10  # the config sets none
    assert ckpt["vitx"]["class_names"] == names


def test_a_variant_on_the_command_line_replaces_the_configs_dimensions(tiny_shapes, tmp_path, capsys):
    import torch

    # conf/vit/cifar10.yaml sets patch 4, depth 6, width 192; Ti/16 is patch 16, depth 12, width 192, 3 heads
    ckpt = fit_one_step(tiny_shapes, tmp_path, "--model.vit.variant", "Ti/16", "--model.vit.depth", "1",
                        "--model.vit.image_size", "32", config=CIFAR10)
    network = torch.load(ckpt, map_location="cpu", weights_only=True)["vitx"]["network"]
    assert (network["patch_size"], network["depth"], network["embed_dim"], network["mlp_dim"]) == (16, 1, 192, 768)
    assert "replaces patch_size 4" in capsys.readouterr().err  # and says so; depth 1 was a flag, so it stays


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    described = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.strip()]
    for verb in ("fit", "validate", "test", "predict", "data", "analyze", "zeroshot"):
        assert any(verb in d.split("|") for d in described), f"{verb} is not described in {out}"


class _Payload:
    """A pickle that runs code when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def http_dir(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_checkpoint_url_cannot_run_code(http_dir, tiny_shapes):
    folder, url = http_dir
    marker = folder / "pwned"
    name = f"evil-{os.getpid()}-{id(marker)}.ckpt"  # a fresh URL: nothing cached from another test
    with open(folder / name, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Payload(marker)}, f)
    # with --weights_only false (the user trusts the file) the payload would run: the marker would exist
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        main(["validate", "--config", PRETRAIN, "--ckpt_path", f"{url}/{name}",
              "--data.val_shards", str(tiny_shapes / "val-000000.tar"), "--data.synthesize_if_missing", "false",
              "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--model.vit.image_size", "16",
              "--model.vit.num_classes", "10"])
    assert not marker.exists(), "loading the checkpoint ran its payload"


def test_config_fields_have_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "vit_experiments.tasks.classification.ImageClassifier", "--model.vit.help"])
    out = capsys.readouterr().out
    assert "square input side in pixels" in out and "stochastic depth" in out
