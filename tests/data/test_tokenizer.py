"""The caption tokenizer: round trip, fixed length, truncation that keeps the end token, determinism, files."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import pytest
import torch

from data_pipelines.tokenizer import CaptionTokenizer, main_train_tokenizer

CAPTIONS = [
    "A small red circle in the top left corner.",
    "a large blue square at the bottom right",
    "Two dogs run along the beach, one carries a stick.",
    "A man in a red shirt climbs a rock wall.",
    "a child jumps into a swimming pool",
    "the big green triangle in the centre",
] * 4


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=400, context_length=16)


def test_round_trip_is_lower_cased_and_whitespace_clean(tok):
    ids = tok.encode(["A  Small RED circle\tin the   top left corner."])
    assert tok.decode(ids[0]) == "a small red circle in the top left corner."
    for caption in CAPTIONS[:6]:
        assert tok.decode(tok.encode(caption)[0]) == caption.lower()


def test_unseen_characters_survive_as_bytes(tok):
    text = "naïve ☃"  # bytes never seen in training: no unknown token
    assert tok.decode(tok.encode(text)[0]) == text


def test_fixed_length_with_start_end_and_zero_padding(tok):
    ids = tok(CAPTIONS[:6])
    assert ids.dtype == torch.int64 and ids.shape == (6, 16)
    assert (ids[:, 0] == tok.sot_id).all()
    for row in ids:
        (eot,) = (row == tok.eot_id).nonzero()[:, 0].tolist()  # exactly one end token
        assert (row[eot + 1 :] == tok.pad_id).all() and (row[:eot] != tok.pad_id).all()
    assert tok.encode("")[0, :3].tolist() == [tok.sot_id, tok.eot_id, tok.pad_id]


def test_truncation_keeps_the_end_token(tok):
    ids = tok.encode(" ".join(["circle square triangle"] * 20))[0]
    assert ids.shape == (16,)
    assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id
    assert (ids[1:-1] != tok.pad_id).all() and (ids[1:-1] != tok.eot_id).all()


def test_training_twice_gives_the_same_vocabulary():
    a = CaptionTokenizer.train(CAPTIONS, vocab_size=400)
    b = CaptionTokenizer.train(CAPTIONS, vocab_size=400)
    assert a.to_str() == b.to_str()
    assert a.vocab_size <= 400 and a.context_length == 77


def test_save_load_and_pickle_keep_everything(tok, tmp_path):
    path = tok.save(tmp_path / "run" / "tokenizer.json")
    json.loads(path.read_text())  # one plain JSON file
    again = CaptionTokenizer.load(path)
    assert again.context_length == 16 and again.vocab_size == tok.vocab_size
    assert torch.equal(again(CAPTIONS), tok(CAPTIONS))
    assert torch.equal(pickle.loads(pickle.dumps(tok))(CAPTIONS), tok(CAPTIONS))


def test_bad_inputs_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        CaptionTokenizer.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="vocab_size"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=100)


def _write_caption_shard(path, captions_per_sample):
    with tarfile.open(path, "w") as tar:
        for i, caps in enumerate(captions_per_sample):
            for ext, data in (("jpg", b"not an image"), ("txt", "\n".join(caps).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_command_trains_on_shards_and_text_files(tmp_path, capsys):
    for s in range(2):  # two shards, several captions per sample, one per line
        _write_caption_shard(tmp_path / f"train-{s:06d}.tar", [CAPTIONS[i : i + 3] for i in range(0, 12, 3)])
    out = tmp_path / "tok.json"
    assert main_train_tokenizer([str(tmp_path / "train-{000000..000001}.tar"), str(out), "--vocab-size", "300"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["context_length"] == 77 and CaptionTokenizer.load(out).vocab_size == report["vocab_size"]

    table = tmp_path / "captions.tsv"
    table.write_text("".join(f"img{i}.jpg\t{c}\n" for i, c in enumerate(CAPTIONS)))
    main_train_tokenizer([str(table), str(tmp_path / "tok2.json"), "--context-length", "32"])
    assert CaptionTokenizer.load(tmp_path / "tok2.json").context_length == 32


def test_command_names_a_missing_source(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main_train_tokenizer([str(tmp_path / "train-{000000..000003}.tar"), str(tmp_path / "t.json")])
    assert "missing" in capsys.readouterr().err
