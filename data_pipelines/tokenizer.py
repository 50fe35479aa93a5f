"""Byte-level BPE tokenizer for captions, trained on the corpus itself (nothing is downloaded).

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision") encodes a
caption as lower-cased byte-pair-encoding tokens (Sennrich et al. 2016, "Neural Machine Translation of Rare
Words with Subword Units"), bracketed by start- and end-of-text tokens and padded to a fixed context of 77.
Byte-level BPE (the GPT-2 variant) never meets an unknown character: its base alphabet is the 256 bytes.

Token ids: 0 = padding, 1 = start of text, 2 = end of text, then the bytes and the learned merges. Every
encoded caption is exactly `context_length` long; a long caption is cut *before* the end token, so the end
token, whose feature the text tower reads, is always present.

The whole tokenizer, context length included, is one JSON file (the Hugging Face `tokenizers` format), which
is saved beside a training run and inside its checkpoints. The tokenizers of pretrained CLIP weights (OpenAI's
BPE merges file, a Hugging Face tokenizer.json) load into the same class: data_pipelines/bpe.py. A
CaptionTokenizer's start and end ids are the tokens its post-processor puts around a caption.

    vitx data train-tokenizer 'data/captions/train-{000000..000009}.tar' data/captions/tokenizer.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import braceexpand
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .samples import caption_lines

PAD, SOT, EOT = "<pad>", "<start_of_text>", "<end_of_text>"
SPECIAL_TOKENS = (PAD, SOT, EOT)  # ids 0, 1, 2 in this order
DEFAULT_CONTEXT_LENGTH = 77  # CLIP's text context
DEFAULT_VOCAB_SIZE = 8192  # enough for a caption corpus of a few 10k captions; CLIP's is 49408


class CaptionTokenizer:
    """Lower-casing byte-level BPE with start/end tokens and a fixed context length.

    Calling it on a list of captions gives int64 token ids (B, context_length), padded with 0; the data
    pipeline's workers call it, so it pickles (as its JSON).
    """

    def __init__(self, tokenizer: Tokenizer):
        trunc = tokenizer.truncation
        if trunc is None or tokenizer.padding is None:
            raise ValueError("the tokenizer has no fixed context length; train it with CaptionTokenizer.train, or "
                             "import another library's with data_pipelines.bpe.load_tokenizer")
        self._tok = tokenizer
        self.context_length = int(trunc["max_length"])
        # the start and end tokens are the ones the post-processor puts around every caption: 1 and 2 for vitx's
        # own tokenizers (other ids once exported, see checkpoints/clip_export.py), <|startoftext|> and
        # <|endoftext|> (49406, 49407) for CLIP's BPE
        self.sot_id, self.eot_id = _bracket_ids(tokenizer)
        self.pad_id = int(tokenizer.padding["pad_id"])

    # ---- training --------------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        captions: Iterable[str],
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        min_frequency: int = 2,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> "CaptionTokenizer":
        """Learn merges from the captions. The same captions in the same order give the same vocabulary.

        vocab_size counts the 3 special tokens and the 256 bytes, so it must exceed 259; training stops early
        when no pair occurs `min_frequency` times (a small corpus gives a smaller vocabulary).
        """
        if vocab_size <= len(SPECIAL_TOKENS) + 256:
            raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (specials + bytes), got {vocab_size}")
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
        tok = Tokenizer(models.BPE())
        # lower-case and collapse whitespace, as CLIP's text cleaning does
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
        )
        # a leading space on the first word too, so "circle" is one token wherever it stands
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(captions, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{SOT} $A {EOT}", special_tokens=[(SOT, 1), (EOT, 2)]
        )
        # truncation reserves the places of the tokens the post-processor adds: the end token survives
        tok.enable_truncation(max_length=context_length)
        tok.enable_padding(length=context_length, pad_id=0, pad_token=PAD)
        return cls(tok)

    # ---- persistence -----------------------------------------------------------------------------------

    def to_str(self) -> str:
        return self._tok.to_str()

    @classmethod
    def from_str(cls, text: str) -> "CaptionTokenizer":
        return cls(Tokenizer.from_str(text))

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_str())
        return path

    @classmethod
    def load(cls, path: Union[str, Path], context_length: Optional[int] = None) -> "CaptionTokenizer":
        """vitx's tokenizer JSON; also CLIP tokenizers of other libraries (a Hugging Face tokenizer.json, OpenAI's
        merges file, a folder holding one), given `context_length` (default 77): see data_pipelines.bpe."""
        from .bpe import load_tokenizer

        return load_tokenizer(path, context_length)

    def __getstate__(self) -> dict:
        return {"json": self.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]))

    # ---- use -------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Captions -> int64 ids (B, context_length): start, tokens, end, then 0s."""
        return self.encode(texts)

    def encode(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tok.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(len(texts), self.context_length)

    def decode(self, ids: Union[torch.Tensor, Sequence[int]]) -> str:
        """Token ids (one caption) -> text, special tokens dropped; the inverse of encode up to lower-casing
        and whitespace clean-up."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eot_id in ids:  # what follows the end token is padding (id 0 is a real token in CLIP's BPE)
            ids = ids[: ids.index(self.eot_id)]
        return self._tok.decode(ids, skip_special_tokens=True).strip()

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


def _bracket_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(start id, end id): the special tokens the post-processor adds before and after a caption."""
    post = json.loads(tokenizer.to_str()).get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        names = [p["SpecialToken"]["id"] for p in post.get("single", []) if "SpecialToken" in p]
        if len(names) == 2:
            return tuple(int(post["special_tokens"][n]["ids"][0]) for n in names)  # type: ignore[return-value]
    if post.get("type") in ("RobertaProcessing", "BertProcessing"):
        return int(post["cls"][1]), int(post["sep"][1])
    raise ValueError("the tokenizer adds no start and end token around a caption (its post_processor); train one "
                     "with CaptionTokenizer.train, or import another library's with data_pipelines.bpe.load_tokenizer")


# ----------------------------------------------------------------------------------------------------------
# captions out of shards or text files


def _captions_in_shard(path: str) -> Iterator[str]:
    """Every caption line of every `.txt` member of a tar shard."""
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if member.isreg() and member.name.endswith(".txt"):
                yield from caption_lines(tar.extractfile(member).read())


def _captions_in_table(path: Path, caption_col: int) -> Iterator[str]:
    """Captions of a text file: one per line, or column `caption_col` of a .tsv/.csv (header rows are
    harmless: they add one caption)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".tsv", ".csv", ".tab"):
        delimiter = "," if path.suffix.lower() == ".csv" else "\t"
        for row in csv.reader(io.StringIO(text), delimiter=delimiter):
            if row and row[caption_col].strip():
                yield row[caption_col].strip()
    else:
        for line in text.split("\n"):  # not splitlines(): a caption may hold U+2028 and the like
            if line.strip():
                yield line.strip()


def iter_captions(sources: Sequence[str], caption_col: int = -1) -> Iterator[str]:
    """Captions from shard patterns (brace expansion: 'train-{000000..000009}.tar') and text files."""
    for source in sources:
        paths = list(braceexpand.braceexpand(source))
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{source!r}: {len(missing)} file(s) missing ({missing[0]}, ...); give tar shards with `.txt` "
                "members (`vitx data from-csv` writes them) or a text file with one caption per line"
            )
        for p in paths:
            if p.endswith((".tar", ".tar.gz", ".tgz")):
                yield from _captions_in_shard(p)
            else:
                yield from _captions_in_table(Path(p), caption_col)


def train_tokenizer(
    sources: Sequence[str],
    out: Union[str, Path],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    caption_col: int = -1,
) -> CaptionTokenizer:
    """Train on every caption of `sources` and save the JSON to `out`."""
    captions = list(iter_captions(sources, caption_col))
    if not captions:
        raise ValueError(f"no captions found in {list(sources)}; shards need `.txt` members")
    tok = CaptionTokenizer.train(captions, vocab_size, min_frequency, context_length)
    tok.save(out)
    return tok


def main_train_tokenizer(argv: Optional[Sequence[str]] = None) -> int:
    """`vitx data train-tokenizer SHARDS_OR_TXT [...] OUT`."""
    parser = argparse.ArgumentParser(
        prog="vitx data train-tokenizer",
        description="Train the byte-level BPE caption tokenizer (CLIP) on the captions of shards or text files.",
    )
    parser.add_argument("sources", nargs="+", metavar="SHARDS_OR_TXT",
                        help="tar shards with .txt members (brace patterns allowed), or text/.tsv/.csv files")
    parser.add_argument("out", metavar="OUT", help="the tokenizer JSON to write, e.g. data/captions/tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT_LENGTH)
    parser.add_argument("--caption-col", type=int, default=-1, help="caption column of a .tsv/.csv (default: last)")
    args = parser.parse_args(argv)
    try:
        tok = train_tokenizer(args.sources, args.out, args.vocab_size, args.min_frequency, args.context_length,
                              args.caption_col)
    except (FileNotFoundError, ValueError) as exn:
        parser.error(str(exn))
    print(json.dumps({"out": str(args.out), "vocab_size": tok.vocab_size, "context_length": tok.context_length}))
    return 0
