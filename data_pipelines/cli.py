"""`vitx data ...`: make and inspect shard sets.

    vitx data synth OUT [--train N --val N --image-size S --seed S --shard-size N]
    vitx data from-folder SRC OUT [--shard-size N --seed S --limit N --rename test:val]
    vitx data from-csv CAPTIONS IMAGES OUT [--shard-size N --val-fraction F --image-col C --caption-col C]
    vitx data inspect PATTERN [--verify] [--write-sizes] [--json]
    vitx data synth-captions OUT [--train N --val N --image-size S --captions K]
    vitx data train-tokenizer SHARDS_OR_TXT [...] OUT [--vocab-size V --context-length L]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitx data", description="Make and inspect WebDataset shard sets.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write the seeded synthetic shapes corpus (10 classes)")
    s.add_argument("out", help="output directory")
    s.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    s.add_argument("--val", type=int, default=2000, help="validation images (default 2000)")
    s.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")

    f = sub.add_parser("from-folder", help="image-folder tree SRC/<split>/<class>/*.jpg (or its .tar.gz) -> shards")
    f.add_argument("src", help="directory or .tar/.tar.gz of <split>/<class>/<image>")
    f.add_argument("out", help="output directory")
    f.add_argument("--shard-size", type=int, default=1000)
    f.add_argument("--seed", type=int, default=0, help="seed of the per-split sample shuffle")
    f.add_argument("--limit", type=int, default=None, help="keep only N samples per split (a class-mixed subset)")
    f.add_argument("--rename", action="append", default=[], metavar="FROM:TO",
                   help="rename a split, e.g. test:val (repeatable)")

    c = sub.add_parser("from-csv", help="CSV/TSV of (image, caption) + images -> image-text shards")
    c.add_argument("captions", help="CSV or TSV file, one (image, caption) row per caption")
    c.add_argument("images", help="directory or tar of the image files")
    c.add_argument("out", help="output directory")
    c.add_argument("--shard-size", type=int, default=1000)
    c.add_argument("--val-fraction", type=float, default=0.1, help="share of images for validation (default 0.1)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--image-col", default="0", help="image column: index or header name (default 0)")
    c.add_argument("--caption-col", default="1", help="caption column: index or header name (default 1)")
    c.add_argument("--delimiter", default=None, help="field separator (default: tab for .tsv, else comma)")
    c.add_argument("--limit", type=int, default=None, help="keep only N images")

    i = sub.add_parser("inspect", help="report shards, samples, keys, sizes, labels/captions, problems")
    i.add_argument("pattern", help="shard pattern, e.g. 'out/train-{000000..000009}.tar'")
    i.add_argument("--verify", action="store_true", help="decode every image fully (slower)")
    i.add_argument("--write-sizes", action="store_true", help="write sizes.json beside the (local) shards")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--allow-pipe", action="store_true", help="accept pipe: URLs (they run shell commands)")
    # CLIP's verbs parse their own arguments (see main_data); listed here for `vitx data --help`
    sub.add_parser("synth-captions", help="write the captioned synthetic shapes corpus (CLIP demo)", add_help=False)
    sub.add_parser("train-tokenizer", help="train the caption BPE tokenizer on shards or text files", add_help=False)
    return p


def _col(spec: str) -> str | int:
    return int(spec) if spec.isdigit() else spec


def _print_patterns(patterns: dict[str, str], seconds: float) -> None:
    for split, pattern in patterns.items():
        print(f"{split:6s} {pattern}")
    print(f"done in {seconds:.1f}s; point the data config at these patterns, e.g. --data.train_shards '{patterns.get('train', '')}'")


def main_data(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `vitx data`; returns the exit status."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv and argv[0] == "synth-captions":
        from .writers_captions import main_synth_captions

        return main_synth_captions(argv[1:])
    if argv and argv[0] == "train-tokenizer":
        from .tokenizer import main_train_tokenizer

        return main_train_tokenizer(argv[1:])
    args = _build_parser().parse_args(list(argv) if argv is not None else None)
    start = time.time()
    try:
        if args.command == "synth":
            from .writers import write_synthetic

            patterns = write_synthetic(
                args.out, num_train=args.train, num_val=args.val, image_size=args.image_size,
                seed=args.seed, shard_size=args.shard_size,
            )
            _print_patterns(patterns, time.time() - start)
        elif args.command == "from-folder":
            from .writers import write_image_folder

            rename = {}
            for item in args.rename:
                if ":" not in item:
                    raise ValueError(f"--rename takes FROM:TO, got {item!r}")
                a, b = item.split(":", 1)
                rename[a] = b
            patterns = write_image_folder(
                args.src, args.out, shard_size=args.shard_size, seed=args.seed, limit=args.limit, rename_splits=rename
            )
            _print_patterns(patterns, time.time() - start)
        elif args.command == "from-csv":
            from .writers_csv import write_caption_corpus

            patterns = write_caption_corpus(
                args.captions, args.images, args.out, shard_size=args.shard_size, val_fraction=args.val_fraction,
                seed=args.seed, image_col=_col(args.image_col), caption_col=_col(args.caption_col),
                delimiter=args.delimiter, limit=args.limit,
            )
            _print_patterns(patterns, time.time() - start)
        elif args.command == "inspect":
            from .inspection import format_report, inspect_shards
            from .metadata import read_classes
            from .urls import expand_urls

            report = inspect_shards(args.pattern, verify=args.verify, write_size_file=args.write_sizes, allow_pipe=args.allow_pipe)
            if args.json:
                print(json.dumps(report, indent=1))
            else:
                print(format_report(report, read_classes(expand_urls(args.pattern, allow_pipe=args.allow_pipe))))
            return 1 if report["num_problems"] else 0
    except (FileNotFoundError, FileExistsError, ValueError) as exn:
        print(f"vitx data {args.command}: error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_data())
