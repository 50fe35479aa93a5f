"""`vitx data ...` verbs through main_data(argv)."""

from __future__ import annotations

import json

from data_pipelines.cli import main_data
from tests.conftest import shared_data

from .conftest import jpeg, write_tar


def test_synth_and_inspect(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main_data(["synth", str(out), "--train", "60", "--val", "20", "--image-size", "16", "--shard-size", "25"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}/train-{{000000..000002}}.tar" in printed
    assert main_data(["inspect", f"{out}/train-{{000000..000002}}.tar", "--verify"]) == 0
    report = capsys.readouterr().out
    assert "samples   60" in report and "16x16 (60)" in report and "circle" in report and "problems  0" in report


def test_from_folder(tmp_path, capsys):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            for i in range(3):
                (tmp_path / "src" / split / cls / f"{i}.jpg").write_bytes(jpeg(i))
    assert main_data(["from-folder", str(tmp_path / "src"), str(tmp_path / "out"), "--rename", "test:val"]) == 0
    assert sorted(json.loads((tmp_path / "out" / "sizes.json").read_text())) == ["train-000000.tar", "val-000000.tar"]
    assert main_data(["from-folder", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_reports_problems_and_writes_sizes(tmp_path, capsys):
    samples = [{"__key__": f"k{i}", "jpg": jpeg(i), "cls": str(i % 2).encode()} for i in range(6)]
    samples[2]["jpg"] = b"broken"
    del samples[4]["cls"]
    write_tar(tmp_path / "x-000000.tar", samples)
    write_tar(tmp_path / "x-000001.tar", samples[:3])
    code = main_data(["inspect", str(tmp_path / "x-{000000..000001}.tar"), "--write-sizes", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["samples"] == 9 and report["num_problems"] == 2
    assert any("k2" in p and "decode" in p for p in report["problems"])
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"x-000000.tar": 6, "x-000001.tar": 3}


def test_from_csv_flickr_subset(tmp_path, capsys):
    src = shared_data("flickr8k-2k")
    code = main_data(["from-csv", str(src / "captions.tsv"), str(src / "images.tar"), str(tmp_path), "--limit", "20",
                      "--val-fraction", "0.25"])
    assert code == 0 and "val" in capsys.readouterr().out
    assert main_data(["inspect", f"{tmp_path}/train-000000.tar", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 15 and report["caption_words"]["captions"] == 75
    assert report["image_sizes"] == {"224x224": 15}
