"""Remote shards over a flaky local HTTP server: reads retried with backoff, a broken shard reopened and read on
from the sample where it broke (never a sample twice), remote patterns checked before training (issue 14)."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from data_pipelines.samples import ImageLabelDecoder
from data_pipelines.shards import ShardReadError, iter_shard
from data_pipelines.streaming import ShardStream
from data_pipelines.urls import expand_urls

SIZES = [37, 20, 45, 8, 30]  # 140 samples


def _stream(pattern, **kw) -> ShardStream:
    kw.setdefault("retry_backoff", 0.001)
    kw.setdefault("batch_size", 4)
    return ShardStream(pattern, ImageLabelDecoder(8), train=kw.pop("train", False), shuffle_buffer=8, **kw)


def test_every_sample_exactly_once_through_refusals_resets_and_cuts(shards, faulty_server):
    local = shards(SIZES)
    server = faulty_server(local.rsplit("/", 1)[0], faults=3, seed=1)
    pattern = f"{server.url}/train-{{000000..000004}}.tar"
    for url, local_url in zip(expand_urls(pattern), expand_urls(local)):  # the raw reader, shard by shard
        remote_keys = [s["__key__"] for _, s, _ in iter_shard(url, retries=4, backoff=0.001)]
        assert remote_keys == [s["__key__"] for _, s, _ in iter_shard(local_url)]
    for seed in range(2, 6):  # more fault sequences, read through the stream as validation and as training
        server.requests.clear()
        server.faults = 3
        ds = _stream(pattern, retries=4)
        assert ds.sizes == SIZES  # sizes.json fetched from beside the shards
        labels = torch.cat([y for _, y in ds]).tolist()
        assert sorted(labels) == list(range(140)) and ds.stats.summary()["errors"] == 0
        train = _stream(pattern, train=True, retries=4, world_size=2, rank=0, seed=seed)
        got = [y for r in range(2) for w in range(2) for _, y in train.iter_slot(0, r, 2, w, 2)]
        labels = torch.cat(got).tolist()
        assert len(labels) == len(set(labels)) == 2 * len(train) * 4 == 136
    assert set(server.served) == {"ok", *server.KINDS}  # every kind of fault was served, and survived


def test_a_shard_broken_past_the_retries_is_a_counted_skip(shards, faulty_server):
    local = shards(SIZES)
    server = faulty_server(local.rsplit("/", 1)[0], faults=1000)
    pattern = f"{server.url}/train-{{000000..000004}}.tar"
    with pytest.raises(ShardReadError, match=r"after 3 attempts"):
        list(iter_shard(expand_urls(pattern)[0], retries=2, backoff=0.001))
    server.faults = 0
    ds = _stream(pattern, retries=1, max_error_rate=1.0)  # the check at construction passes
    server.faults = 1000  # then every request fails: each shard breaks somewhere, twice
    labels = torch.cat([y for _, y in ds]).tolist()
    lost = ds.stats.summary()["errors_by_shard"]
    assert len(labels) == len(set(labels)) and set(lost) == {f"train-{s:06d}.tar" for s in range(5)}
    assert len(labels) + sum(lost.values()) == 140  # what was not read is counted, what was read is read once


def test_nothing_listening_fails_before_training_with_the_url(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pattern = f"http://127.0.0.1:{port}/train-{{000000..000003}}.tar"
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=rf"cannot read the first shard http://127.0.0.1:{port}/train-000000.tar"):
        _stream(pattern, retries=2)
    assert time.monotonic() - start < 10
