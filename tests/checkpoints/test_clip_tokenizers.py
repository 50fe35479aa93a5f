"""CLIP tokenizers of other libraries (data_pipelines.bpe): ids equal to transformers' CLIPTokenizer on a tiny
vocabulary, OpenAI's start/end/padding rules, and the text tower finding the end token of each caption."""

from __future__ import annotations

import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_pipelines.bpe import from_merges_file, load_tokenizer  # noqa: E402
from data_pipelines.tokenizer import CaptionTokenizer  # noqa: E402
from tests.checkpoints.clip_fixtures import EOT, SOT, VOCAB, hf_tokenizer, write_openai_merges  # noqa: E402
from vit_experiments.models.text import TextConfig, TextTransformer  # noqa: E402

TEXTS = [
    "A Photo of a DOG.",
    "  the   dog's\tphoto ,  photographed!!  ",
    "Two cats, 42 dogs & a naïve ☃ on 3/4",
    "they're <|endoftext|> ok",
    "a red circle " * 12,  # longer than the context: cut before the end token
    "",
]
CONTEXT = 16


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_tokenizer(tmp_path_factory.mktemp("vocab"))


def expected(hf, texts) -> torch.Tensor:
    """transformers' ids, truncated to the context, then OpenAI's zero padding."""
    out = torch.zeros(len(texts), CONTEXT, dtype=torch.int64)
    for row, ids in enumerate(hf(texts, truncation=True, max_length=CONTEXT)["input_ids"]):
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def test_openai_merges_file_gives_transformers_ids(hf, tmp_path):
    tok = from_merges_file(write_openai_merges(tmp_path / "bpe_simple_vocab_16e6.txt.gz"), CONTEXT)
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.vocab_size) == (SOT, EOT, 0, len(VOCAB))
    ids = tok(TEXTS)
    assert torch.equal(ids, expected(hf, TEXTS))
    assert ids[4, -1] == EOT and (ids[4, 1:-1] != EOT).all()  # truncated, the end token kept
    assert ids[5, :3].tolist() == [SOT, EOT, 0]
    assert tok.decode(ids[0]) == "a photo of a dog ."  # OpenAI's decoding: </w> as a space
    assert torch.equal(pickle.loads(pickle.dumps(tok))(TEXTS), ids)


def test_tokenizer_json_and_vocab_merges_give_transformers_ids(hf, tmp_path):
    hf.save_pretrained(tmp_path / "saved")  # tokenizer.json
    from_json = load_tokenizer(tmp_path / "saved", CONTEXT)
    assert torch.equal(from_json(TEXTS), expected(hf, TEXTS))
    hf_tokenizer(tmp_path / "files")  # vocab.json + merges.txt, the files of older transformers
    from_files = load_tokenizer(tmp_path / "files", CONTEXT)
    assert torch.equal(from_files(TEXTS), expected(hf, TEXTS))
    # an imported tokenizer saves as one JSON, which CaptionTokenizer reads back as it is
    again = CaptionTokenizer.load(from_json.save(tmp_path / "tokenizer.json"))
    assert again.context_length == CONTEXT and torch.equal(again(TEXTS), from_json(TEXTS))


def test_text_tower_finds_each_end_token(tmp_path):
    tok = CaptionTokenizer.load(write_openai_merges(tmp_path / "merges.txt.gz"), context_length=CONTEXT)
    ids = tok(TEXTS)
    first = TextTransformer(TextConfig(vocab_size=tok.vocab_size, context_length=CONTEXT, width=16, depth=1,
                                       num_heads=2, eot_token_id=tok.eot_id), 8)
    argmax = TextTransformer(TextConfig(vocab_size=tok.vocab_size, context_length=CONTEXT, width=16, depth=1,
                                        num_heads=2, eot_token_id=tok.eot_id, eot_pooling="argmax"), 8)
    where = torch.tensor([row.tolist().index(EOT) for row in ids])
    assert torch.equal(first.eot_positions(ids), where) and torch.equal(argmax.eot_positions(ids), where)


def test_bad_tokenizer_files_say_what_to_do(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\nab\n")
    with pytest.raises(ValueError, match="two symbols"):
        load_tokenizer(tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_tokenizer(tmp_path)
