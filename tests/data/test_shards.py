"""Reading one shard: grouping into samples, truncated tars (issue 14, finding 7), and what inspect reports."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch

from data_pipelines.cli import main_data
from data_pipelines.metadata import write_sizes
from data_pipelines.samples import ImageLabelDecoder
from data_pipelines.shards import ShardReadError, count_samples, iter_shard
from data_pipelines.streaming import ShardStream

from .conftest import jpeg, write_tar


def _shard(path, n=150):
    write_tar(path, [{"__key__": f"s{i:04d}", "jpg": jpeg(i % 7), "cls": str(i).encode()} for i in range(n)])


def cut_at_sample(path, index: int) -> None:
    """Truncate a shard exactly at the header of sample `index`'s first member: a valid-looking shorter tar."""
    with tarfile.open(path) as tar:
        offset = next(m.offset for m in tar.getmembers() if m.name.startswith(f"s{index:04d}."))
    data = path.read_bytes()
    path.write_bytes(data[:offset])


def test_samples_are_grouped_and_counted(tmp_path):
    _shard(tmp_path / "a.tar", 10)
    got = list(iter_shard(str(tmp_path / "a.tar"), 3, 6))
    assert [(i, s["__key__"], p) for i, s, p in got] == [(i, f"s{i:04d}", None) for i in range(3, 6)]
    assert set(got[0][1]) == {"__key__", "__url__", "jpg", "cls"}
    assert count_samples(str(tmp_path / "a.tar")) == 10


def test_truncation_at_a_header_boundary_is_detected(tmp_path):
    """A tar cut at a member boundary read as a valid 76-sample shard: the reader must say it is truncated."""
    path = tmp_path / "train-000000.tar"
    _shard(path)
    cut_at_sample(path, 76)
    with tarfile.open(path) as tar:  # what Python's tarfile (and so webdataset) makes of it: no error
        assert len(tar.getmembers()) == 152
    read = []
    with pytest.raises(ShardReadError, match="truncated tar"):
        for index, _, _ in iter_shard(str(path)):
            read.append(index)
    assert read == list(range(75))  # sample 75 may have lost members after the cut: not trusted
    path.write_bytes(b"")
    with pytest.raises(ShardReadError):
        list(iter_shard(str(path)))


def test_truncated_shard_is_counted_by_the_stream(tmp_path):
    path = tmp_path / "val-000000.tar"
    _shard(path)
    cut_at_sample(path, 76)
    ds = ShardStream(str(path), ImageLabelDecoder(8), batch_size=10, train=False, max_error_rate=0.9)
    assert len(torch.cat([y for _, y in ds])) == 75
    assert ds.stats.summary()["errors_by_shard"] == {"val-000000.tar": 1}
    write_sizes(tmp_path, {"val-000000.tar": 150})  # with the size file, every missing sample is counted
    ds = ShardStream(str(path), ImageLabelDecoder(8), batch_size=10, train=False, max_error_rate=0.9)
    assert len(torch.cat([y for _, y in ds])) == 75 and ds.stats.summary()["errors"] == 75


def test_inspect_reports_truncation_and_keeps_the_size_file(tmp_path, capsys):
    path = tmp_path / "train-000000.tar"
    _shard(path)
    write_sizes(tmp_path, {"train-000000.tar": 150})
    cut_at_sample(path, 76)
    code = main_data(["inspect", str(path), "--verify", "--write-sizes", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["num_problems"] >= 1
    assert any("truncated" in p for p in report["problems"])
    assert any("sizes.json lists 150" in p for p in report["problems"])
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"train-000000.tar": 150}  # not rewritten to 75


def test_a_caption_with_a_line_separator_stays_one_caption(tmp_path):
    """Issue 14, finding 13: str.splitlines() also splits at U+2028 (and U+0085, form feeds, ...), so one caption
    holding one became two, and the 'first' caption was half of it."""
    from data_pipelines.samples import ImageTextDecoder, caption_lines

    text = "a dog\u2028on a beach\x0c at dusk\nsecond caption\r\n\n"
    assert caption_lines(text.encode()) == ["a dog\u2028on a beach\x0c at dusk", "second caption"]
    write_tar(tmp_path / "c.tar", [{"__key__": "k", "jpg": jpeg(0), "txt": text.encode()}])
    (sample,) = [s for _, s, _ in iter_shard(str(tmp_path / "c.tar"))]
    import random

    _, caption, _ = ImageTextDecoder(8, caption="first").decode(sample, random.Random(0), 0, False)
    assert caption == "a dog\u2028on a beach\x0c at dusk"
    assert main_data(["inspect", str(tmp_path / "c.tar"), "--json"]) == 0
