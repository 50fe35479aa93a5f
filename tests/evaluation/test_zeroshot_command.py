"""`vitx zeroshot` on a tiny CLIP trained here with the real `vitx fit --config conf/clip/demo.yaml` (shrunk): the
same accuracy and recall as the training run's ZeroShotEvaluation / RetrievalEvaluation callbacks on the same
images with the same templates, on shards and on a folder of class sub-directories, and the clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_pipelines.metadata import write_classes
from data_pipelines.shards import iter_shard
from data_pipelines.synthetic import encode_jpeg
from data_pipelines.writers import ShardSink
from tests.tasks.test_contrastive import DEMO, tiny_args
from vit_experiments.checkpoints import METADATA_KEY, network_metadata
from vit_experiments.cli import main
from vit_experiments.evaluation.templates import CLIP_IMAGENET_80, SHAPES, TEMPLATE_SETS, get_templates
from vit_experiments.models.vit import ViTConfig, VisionTransformer
from vit_experiments.zeroshot import ZeroShotError, evaluate, open_corpus
from vit_experiments.zeroshot import class_names_for, main_zeroshot


@pytest.fixture(scope="module")
def corpus(tiny_captions) -> Path:
    return tiny_captions


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    """One epoch (4 steps) of the demo config; its validation runs both evaluation callbacks."""
    runs = tmp_path_factory.mktemp("runs")
    main(["fit", *tiny_args(DEMO, corpus, runs, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
                            "--analysis.log_images", "false", "--analysis.save_figures", "false",
                            "--analysis.at_start", "false")])
    (path,) = runs.glob("*/version_*")
    return path


@pytest.fixture(scope="module")
def class_folder(corpus, tmp_path_factory) -> Path:
    """The validation shard unpacked into FOLDER/<class name>/<key>.jpg."""
    names = json.loads((corpus / "classes.json").read_text())
    out = tmp_path_factory.mktemp("folder")
    for _, sample, _ in iter_shard(str(corpus / "val-000000.tar")):
        d = out / names[int(sample["cls"])]
        d.mkdir(exist_ok=True)
        (d / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
    return out


def logged(run: Path) -> dict[str, float]:
    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


def zeroshot(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "zs.json"
    rc = main_zeroshot([*args, "--device", "cpu", "--out", str(out)])
    return rc, (json.loads(out.read_text()) if rc == 0 else {})


def test_shards_give_the_callbacks_accuracy_and_recall(run_dir, corpus, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    rc, res = zeroshot(tmp_path, "--ckpt", str(ckpt), "--images", str(corpus / "val-000000.tar"),
                       "--templates", "shapes")
    assert rc == 0
    tags = logged(run_dir)
    cls = res["classification"]
    assert res["num_images"] == 32 and res["num_templates"] == len(SHAPES) and cls["num_classes"] == 10
    assert cls["acc1"] == pytest.approx(tags["val/zeroshot/acc1"], abs=1e-6)
    assert cls["acc5"] == pytest.approx(tags["val/zeroshot/acc5"], abs=1e-6)
    assert cls["chance"] == {"acc1": 0.1, "acc5": 0.5}
    assert sum(v["num_images"] for v in cls["per_class"].values()) == 32
    assert "horizontal bar" in cls["class_names"]  # classes.json's underscores read as spaces, as the callback does
    ret = res["retrieval"]
    assert ret["num_captions"] == 96  # 3 captions an image
    for key in ("image_to_text/R@1", "image_to_text/R@5", "text_to_image/R@1", "text_to_image/R@10"):
        assert ret[key] == pytest.approx(tags[f"val/retrieval/{key}"], abs=1e-6), key
    out = capsys.readouterr().out
    assert "acc1" in out and "retrieval image_to_text" in out and "wrote" in out


def test_folder_of_classes_equals_the_shards(run_dir, corpus, class_folder, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    rc, from_shards = zeroshot(tmp_path, "--ckpt", ckpt, "--images", str(corpus), "--templates", "shapes")  # val-*.tar
    assert rc == 0 and from_shards["shards"] == [str(corpus / "val-000000.tar")]
    rc, from_folder = zeroshot(tmp_path, "--ckpt", ckpt, "--images", str(class_folder), "--templates", "shapes",
                               "--batch-size", "7")
    assert rc == 0 and from_folder["corpus"] == "folder" and "retrieval" not in from_folder
    assert from_folder["num_images"] == 32
    a, b = from_folder["classification"], from_shards["classification"]
    assert a["class_names"] == sorted(b["class_names"])  # labels index the sorted sub-directories
    assert (a["acc1"], a["acc5"]) == pytest.approx((b["acc1"], b["acc5"]), abs=1e-6)
    # --num-images takes the classes in turn, so 10 images are one of each class
    rc, ten = zeroshot(tmp_path, "--ckpt", ckpt, "--images", str(class_folder), "--num-images", "10",
                       "--templates", "clip-imagenet-80")
    assert rc == 0 and ten["num_images"] == 10 and ten["num_templates"] == 80
    assert all(v["num_images"] == 1 for v in ten["classification"]["per_class"].values())


def _vit_checkpoint(path: Path) -> Path:
    cfg = ViTConfig(variant=None, image_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                    num_classes=10)
    state = {f"model.{k}": v for k, v in VisionTransformer(cfg).state_dict().items()}
    torch.save({METADATA_KEY: network_metadata(cfg), "state_dict": state}, path)
    return path


def test_refusals(run_dir, corpus, class_folder, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    unnamed = tmp_path / "unnamed"  # labelled shards without classes.json
    unnamed.mkdir()
    shutil.copy(corpus / "val-000000.tar", unnamed / "val-000000.tar")
    flat = tmp_path / "flat"  # images but no class sub-directories
    flat.mkdir()
    shutil.copy(next(class_folder.rglob("*.jpg")), flat / "a.jpg")
    bare = tmp_path / "bare.pt"
    # bare ViT weights (64 wide: their heads, 64-wide, can be inferred): read as a ViT, not a CLIP
    torch.save(VisionTransformer(ViTConfig(variant=None, image_size=16, patch_size=8, embed_dim=64, depth=1,
                                           num_heads=1, mlp_dim=64)).state_dict(), bare)
    cases = [
        (["--ckpt", str(_vit_checkpoint(tmp_path / "vit.ckpt")), "--images", str(class_folder)],
         "ViT/DeiT classifier"),
        (["--ckpt", str(bare), "--images", str(class_folder)], "CLIP checkpoint"),
        (["--ckpt", ckpt, "--images", str(unnamed)], "no class names"),
        (["--ckpt", ckpt, "--images", str(flat)], "no class sub-directories"),
        (["--ckpt", ckpt, "--images", str(class_folder), "--classes", "a,b"], "10 class sub-directories"),
        (["--ckpt", ckpt, "--images", str(unnamed), "--classes", "a,b"], "labels run from 0 to 9"),
        (["--ckpt", ckpt, "--images", str(class_folder), "--templates", "nope"], "unknown template set"),
        (["--ckpt", ckpt, "--images", str(tmp_path / "missing-{000000..000001}.tar")], "matches no file"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main_zeroshot([*args, "--device", "cpu"]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
    # named on the command line, the unnamed shards are scored
    rc, res = zeroshot(tmp_path, "--ckpt", ckpt, "--images", str(unnamed), "--templates", "simple",
                       "--classes", ",".join(f"class {i}" for i in range(10)))
    assert rc == 0 and res["classification"]["class_names"][3] == "class 3"
    names = tmp_path / "names.json"
    names.write_text(json.dumps([f"shape {i}" for i in range(10)]))
    rc, from_file = zeroshot(tmp_path, "--ckpt", ckpt, "--images", str(unnamed), "--templates", "simple",
                             "--classes-file", str(names))
    assert rc == 0 and from_file["classification"]["class_names"][0] == "shape 0"


def test_template_sets(tmp_path):
    assert len(CLIP_IMAGENET_80) == len(set(CLIP_IMAGENET_80)) == 80
    assert CLIP_IMAGENET_80[0] == "a bad photo of a {}." and CLIP_IMAGENET_80[-1] == "a tattoo of the {}."
    assert set(TEMPLATE_SETS["clip-imagenet-7"]) <= set(CLIP_IMAGENET_80)
    assert get_templates("simple") == ["a photo of a {}."]
    for name, templates in TEMPLATE_SETS.items():
        assert templates and all(t.count("{}") == 1 for t in templates), name
    demo = DEMO.read_text()
    assert all(f'"{t}"' in demo for t in SHAPES)  # the shapes set is the demo config's
    f = tmp_path / "t.txt"
    f.write_text("# mine\na {} here.\n\nthe {}!\n")
    assert get_templates(str(f)) == ["a {} here.", "the {}!"]
    f.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(str(f))


# -- label bookkeeping, with a model that is right by construction -----------------------------------------------
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
WORDS = ["red", "green", "blue"]  # the fake text tower's axes: channel order


class ColourCLIP(torch.nn.Module):
    """Image -> its mean colour; prompt -> the colour word it names. Every image is classified right, so any
    mix-up of labels and class names shows as a lost accuracy."""

    cfg = SimpleNamespace(vision=SimpleNamespace(image_size=8))

    def encode_image(self, x):
        return F.normalize(x.mean((2, 3)), dim=-1)  # (B, 3)

    def encode_text(self, onehot):
        return F.normalize(onehot.float(), dim=-1)


def colour_tokenizer(texts):
    return torch.stack([torch.tensor([float(w in t.split()[-1]) for w in WORDS]) for t in texts])  # (B, 3)


def _jpeg(colour) -> bytes:
    return encode_jpeg(Image.new("RGB", (8, 8), colour))


@pytest.fixture
def colour_corpora(tmp_path):
    folder = tmp_path / "folder"  # sorted sub-directories: blue, green, red
    shards = tmp_path / "shards"  # classes.json in another order: red, green, blue
    sink = ShardSink(shards, "val", shard_size=4)
    for i in range(9):
        name = WORDS[i % 3] if i != 8 else "red"  # 4 red, 3 green, 2 blue
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{i}.jpg").write_bytes(_jpeg(COLOURS[name]))
        sink.write({"__key__": f"{i:03d}", "jpg": _jpeg(COLOURS[name]), "cls": str(WORDS.index(name)).encode()})
    sink.close()
    write_classes(shards, WORDS)
    (folder / "red" / "broken.jpg").write_bytes(b"not a jpeg")  # a counted, reported skip
    return folder, shards


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_labels_meet_their_class_names(colour_corpora, kind):
    corpus = open_corpus(str(colour_corpora[0] if kind == "folder" else colour_corpora[1]))
    names = class_names_for(corpus, None)
    assert names == (["blue", "green", "red"] if kind == "folder" else WORDS)
    kw = dict(normalization=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), device=torch.device("cpu"), batch_size=2)
    res = evaluate(ColourCLIP(), colour_tokenizer, corpus, names, ["a photo of a {}."], **kw)
    cls = res["classification"]
    assert res["num_images"] == 9 and cls["acc1"] == 1.0
    assert res["num_skipped"] == (1 if kind == "folder" else 0)
    assert {k: v["num_images"] for k, v in cls["per_class"].items()} == {"red": 4, "green": 3, "blue": 2}
    wrong = [names[1], names[2], names[0]]  # names in the wrong order: every image misnamed
    assert evaluate(ColourCLIP(), colour_tokenizer, corpus, wrong, ["{}"], **kw)["classification"]["acc1"] == 0.0
    with pytest.raises(ZeroShotError, match="labels run from 0 to 2"):
        evaluate(ColourCLIP(), colour_tokenizer, corpus, names[:2], ["{}"], **kw)


def test_captions_without_labels_are_retrieved_and_bare_images_refused(tmp_path):
    captioned, bare = tmp_path / "captioned", tmp_path / "bare"
    for out, with_txt in ((captioned, True), (bare, False)):
        sink = ShardSink(out, "val", shard_size=8)
        for i, name in enumerate(WORDS):
            sample = {"__key__": f"{i:03d}", "jpg": _jpeg(COLOURS[name])}
            if with_txt:
                sample["txt"] = f"a {name}\nall {name}".encode()
            sink.write(sample)
        sink.close()
    kw = dict(normalization=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), device=torch.device("cpu"))
    res = evaluate(ColourCLIP(), colour_tokenizer, open_corpus(str(captioned)), None, ["{}"], **kw)
    assert "classification" not in res and res["retrieval"]["num_captions"] == 6
    assert res["retrieval"]["text_to_image/R@1"] == 1.0 and res["retrieval"]["image_to_text/R@1"] == 1.0
    with pytest.raises(ZeroShotError, match="nothing to score"):
        evaluate(ColourCLIP(), colour_tokenizer, open_corpus(str(bare)), None, ["{}"], **kw)
