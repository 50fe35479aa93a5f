"""Shared fixtures: tiny shard sets written once per test session, and the path of the optional real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or a skip when this machine has none (a user's clone has no ../shared)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the real-data tests need ../shared/data beside the repository")
    return path


def scalar_tags(log_dir: Path) -> set[str]:
    """The scalar tags of the TensorBoard events in a run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A synthetic shapes corpus small enough to train on for a few steps: 16-px images, 4 train shards."""
    from data_pipelines.writers import write_synthetic

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic(out, num_train=256, num_val=64, image_size=16, seed=0, shard_size=64)
    return out


@pytest.fixture(scope="session")
def tiny_captions(tmp_path_factory) -> Path:
    """64 + 32 captioned 16-px shapes (jpg + txt + cls, classes.json) and a tokenizer trained on their captions;
    read-only for the tests that share it."""
    from data_pipelines.tokenizer import train_tokenizer
    from data_pipelines.writers_captions import write_synthetic_captions

    out = tmp_path_factory.mktemp("captions")
    write_synthetic_captions(out, num_train=64, num_val=32, image_size=16, shard_size=32)
    train_tokenizer([str(out / "train-{000000..000001}.tar")], out / "tokenizer.json", vocab_size=300,
                    context_length=24)
    return out


@pytest.fixture(autouse=True, scope="session")
def _scratch_working_directory(tmp_path_factory):
    """Runs write relative paths (runs/, checkpoints/, analysis/, data/shapes) where they start: in a scratch
    directory, never into the repository or wherever pytest was started."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)
