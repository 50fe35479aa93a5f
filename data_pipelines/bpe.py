"""CLIP tokenizers of other libraries as CaptionTokenizers: OpenAI's BPE merges file and Hugging Face's tokenizer.json.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", section 2.4: CLIP
reads "a lower-cased byte pair encoding (BPE) representation of the text with a 49,152 vocab size (Sennrich et
al., 2015)", bracketed by [SOS] and [EOS]. OpenAI's tokenizer cleans the text (runs of whitespace to one space,
stripped), lower-cases it, and splits it by a regular expression into contractions ('s 't 're 've 'm 'll 'd),
runs of letters, single digits and runs of other non-space characters. Each piece is written in GPT-2's
byte-to-unicode alphabet (every byte a printable character), its last symbol marked with `</w>`, and merged by
the ranked merges. The vocabulary is the 256 byte symbols, the same symbols with `</w>`, one token per merge in
rank order, then `<|startoftext|>` and `<|endoftext|>`: 49408 ids for the 48894 merges OpenAI uses, the end token
the highest. A caption is the start token, its tokens and the end token, cut before the end token and padded
with 0 to the context length (77).

Not reproduced: ftfy's repair of mis-decoded text and the HTML unescaping of OpenAI's clean-up; they change only
captions with broken encodings or HTML entities (Hugging Face's fast CLIP tokenizer skips them too).

    tok = load_tokenizer("bpe_simple_vocab_16e6.txt.gz")        # or a tokenizer.json, or a folder with either
    tok(["a photo of a dog."])                                   # (1, 77) int64, like every CaptionTokenizer
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Optional, Union

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .tokenizer import DEFAULT_CONTEXT_LENGTH, CaptionTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# merges OpenAI's tokenizer reads from bpe_simple_vocab_16e6.txt.gz: 49152 ids less the 256 bytes and the 2 specials
OPENAI_NUM_MERGES = 49152 - 256 - 2
# OpenAI's split (their text is lower-cased first, so the contractions need no upper-case forms); the special
# tokens themselves are matched before this split, as added tokens
PIECES = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# file names a folder of weights may hold its tokenizer under, in order of preference
TOKENIZER_FILES = ("tokenizer.json", "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: the printable Latin-1 bytes stand for themselves, the other 68 (control characters,
    space, ...) for the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # printable bytes first, then the rest: the order of OpenAI's vocabulary
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


def read_merges(path: Union[str, Path], limit: Optional[int] = None) -> list[tuple[str, str]]:
    """The ranked merges of a merges file: OpenAI's bpe_simple_vocab_16e6.txt.gz (gzip) or a Hugging Face
    merges.txt. A first line holding "#version" is the header; `limit` keeps the first merges only."""
    path = Path(path)
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    lines = text.split("\n")
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}, line {number}: a merge is two symbols separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"{path} holds no merges: expected a header line, then one 'a b' merge per line")
    return merges[:limit] if limit is not None else merges


def openai_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's vocabulary for these merges: bytes, bytes with </w>, merged symbols, start, end."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [START, END]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the merges repeat a token; is this a CLIP BPE merges file?")
    return vocab


def _fix_length(tok: Tokenizer, start: str, end: str, context_length: int) -> CaptionTokenizer:
    """Start and end tokens around every caption, cut before the end token, zero padding (OpenAI's rules)."""
    if context_length < 3:
        raise ValueError(f"context_length must be at least 3 (start, one token, end), got {context_length}")
    ids = {name: tok.token_to_id(name) for name in (start, end)}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the tokenizer has no {' or '.join(missing)} token: is it a CLIP tokenizer?")
    tok.add_special_tokens([start, end])  # matched as themselves, before the split
    tok.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}", special_tokens=[(start, ids[start]), (end, ids[end])])
    tok.enable_truncation(max_length=context_length)  # reserves the places of start and end
    tok.enable_padding(length=context_length, pad_id=0, pad_token=tok.id_to_token(0))
    return CaptionTokenizer(tok)


def clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]],
             context_length: int = DEFAULT_CONTEXT_LENGTH) -> CaptionTokenizer:
    """OpenAI's CLIP tokenizer (see the module docstring) over `vocab` and `merges`."""
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="",
                     fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()])
    # keep the pieces, drop what lies between them (the whitespace); then the byte alphabet, no prefix space
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PIECES), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # a word's last token carries </w>: a space in the text, then the bytes back from their symbols
    tok.decoder = decoders.Sequence([decoders.Replace(END_OF_WORD, " "), decoders.ByteLevel()])
    return _fix_length(tok, START, END, context_length)


def from_merges_file(path: Union[str, Path], context_length: int = DEFAULT_CONTEXT_LENGTH) -> CaptionTokenizer:
    """OpenAI's tokenizer from its merges file (bpe_simple_vocab_16e6.txt.gz: the first 48894 merges are used)."""
    merges = read_merges(path, limit=OPENAI_NUM_MERGES)
    return clip_bpe(openai_vocab(merges), merges, context_length)


def from_hf_json(text: str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> CaptionTokenizer:
    """A Hugging Face `tokenizer.json` of a CLIP model (CLIPTokenizerFast.save_pretrained) with OpenAI's rules
    for the start, end and padding; its normalizer, split and merges as saved."""
    tok = Tokenizer.from_str(text)
    start, end = START, END
    post = json.loads(text).get("post_processor") or {}
    if post.get("type") in ("RobertaProcessing", "BertProcessing"):  # what CLIPTokenizerFast saves
        start, end = post["cls"][0], post["sep"][0]
    tok.no_truncation()
    tok.no_padding()
    return _fix_length(tok, start, end, context_length)


def find_tokenizer(folder: Union[str, Path]) -> Optional[Path]:
    """The tokenizer file a folder of weights holds (TOKENIZER_FILES, then vocab.json with merges.txt), if any."""
    folder = Path(folder)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder / "merges.txt"
    return None


def load_tokenizer(path: Union[str, Path], context_length: Optional[int] = None) -> CaptionTokenizer:
    """Any caption tokenizer by its file: vitx's JSON (its own context length), a Hugging Face tokenizer.json, a
    merges.txt beside its vocab.json, OpenAI's merges file (.txt.gz), or a folder holding one of them.
    `context_length` (default 77) applies to the imported ones."""
    path = Path(path)
    if path.is_dir():
        found = find_tokenizer(path)
        if found is None:
            raise FileNotFoundError(f"{path} holds no tokenizer: expected {' or '.join(TOKENIZER_FILES)}, or "
                                    "vocab.json with merges.txt; pass --tokenizer FILE")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; train one on the captions with `vitx data train-tokenizer "
                                f"SHARDS {path}`, or give the tokenizer that came with the weights")
    length = context_length or DEFAULT_CONTEXT_LENGTH
    if path.name == "merges.txt" and (path.parent / "vocab.json").is_file():
        vocab = json.loads((path.parent / "vocab.json").read_text(encoding="utf-8"))
        return clip_bpe(vocab, read_merges(path), length)
    raw = path.read_bytes()
    if raw[:1] != b"{":
        return from_merges_file(path, length)
    text = raw.decode("utf-8")
    d = json.loads(text)
    if d.get("truncation") and d.get("padding"):  # vitx's own (or one imported before): complete as it is
        return CaptionTokenizer.from_str(text)
    return from_hf_json(text, length)
