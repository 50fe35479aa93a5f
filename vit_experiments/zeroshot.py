"""`vitx zeroshot`: zero-shot classification (and retrieval, when the corpus has captions) of a CLIP checkpoint on
any labelled corpus, without training.

    vitx zeroshot --ckpt RUN/checkpoints/last.ckpt --images FOLDER_OR_SHARDS [--classes a,b,c | --classes-file F]
                  [--templates clip-imagenet-80] [--num-images N] [--batch-size 256] [--device cuda] [--out OUT.json]

The corpus is one of
    a folder of class sub-directories  FOLDER/<class>/**/*.jpg; labels index the sorted sub-directory names
    a folder of WebDataset shards      its val-*.tar (else every *.tar), as for a shard pattern:
    a shard pattern                    'data/x/val-{000000..000003}.tar'; samples with `cls` (an integer label)
                                       are classified, samples with `txt` (one caption per line) also retrieved

Class names, put into the prompts in label order, come from `--classes` / `--classes-file` (used as given), else
from the folder's sub-directory names or the classes.json beside the shards (underscores read as spaces, as the
ZeroShotEvaluation callback reads them). Images are prepared like the evaluation pipeline (resize the shorter
side, centre crop; `--crop-pct 1.0` by default, CLIP's and the callback's), normalised with the checkpoint's
mean/std, and the classifier is vit_experiments.evaluation.zeroshot_classifier over the prompt templates
(vit_experiments.evaluation.templates: clip-imagenet-80, clip-imagenet-7, simple, photo, shapes, or a file).
With the same images and templates the accuracy equals the callback's val/zeroshot/acc1.

Prints a summary and writes JSON (`--out`): acc1, acc5, chance, per-class accuracy, retrieval recall at k.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from vit_experiments.analyze import IMAGE_EXTENSIONS, _image_files

PROG = "vitx zeroshot"


class ZeroShotError(ValueError):
    """A problem with what the user asked for: reported as one line, exit status 2."""


# -- the corpus --------------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """Where the images are and what they are labelled with; `samples()` streams them."""

    kind: str  # "folder" or "shards"
    source: str
    shards: list[str] = field(default_factory=list)
    folder_classes: list[str] = field(default_factory=list)  # sorted sub-directory names (kind "folder")
    files: list[tuple[str, int]] = field(default_factory=list)  # (path, label), classes interleaved

    def samples(self, limit: Optional[int], skipped: Optional[list] = None
                ) -> Iterator[tuple[str, bytes, Optional[int], Optional[list[str]]]]:
        """(name, image bytes, label or None, captions or None), at most `limit` of them; malformed samples are
        reported and appended to `skipped`."""
        from data_pipelines.samples import caption_lines
        from data_pipelines.shards import iter_shard
        from data_pipelines.transforms import image_bytes

        n = 0
        if self.kind == "folder":
            for path, label in self.files[:limit]:
                with open(path, "rb") as fh:
                    yield os.path.relpath(path, self.source), fh.read(), label, None
            return
        for url in self.shards:
            for _, sample, problem in iter_shard(url):
                if limit is not None and n >= limit:
                    return
                if problem is not None:
                    print(f"{PROG}: skipping a sample of {url}: {problem}", file=sys.stderr)
                    if skipped is not None:
                        skipped.append(f"{url}: {problem}")
                    continue
                try:
                    data = image_bytes(sample)
                except KeyError:
                    continue  # a sample without an image
                label = int(sample["cls"].decode("ascii").strip()) if "cls" in sample else None
                captions = caption_lines(sample["txt"]) if "txt" in sample else None
                n += 1
                yield sample["__key__"], data, label, captions


def _class_folder(root: str) -> Corpus:
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    per_class = [(d, _image_files(os.path.join(root, d))) for d in subdirs]
    per_class = [(d, files) for d, files in per_class if files]
    if not per_class:
        loose = _image_files(root)
        what = (f"{len(loose)} images but no class sub-directories" if loose
                else f"no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
        raise ZeroShotError(f"{root} holds {what}: zero-shot classification needs FOLDER/<class>/*.jpg or shards "
                            "with `cls` labels")
    # interleave the classes (first image of every class, then the second, ...) so --num-images keeps them all
    longest = max(len(files) for _, files in per_class)
    files = [(files[i], label) for i in range(longest) for label, (_, files) in enumerate(per_class)
             if i < len(files)]
    return Corpus("folder", root, folder_classes=[d for d, _ in per_class], files=files)


def open_corpus(spec: str) -> Corpus:
    """A folder of class sub-directories, a folder of shards, or a shard pattern."""
    from data_pipelines.urls import expand_urls

    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(spec, "val-*.tar"))) or sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not shards:
            return _class_folder(spec)
        return Corpus("shards", spec, shards=shards)
    try:
        return Corpus("shards", spec, shards=expand_urls(spec))
    except (FileNotFoundError, ValueError) as err:
        raise ZeroShotError(str(err)) from err


def _given_classes(args: argparse.Namespace) -> Optional[list[str]]:
    if args.classes and args.classes_file:
        raise ZeroShotError("give --classes or --classes-file, not both")
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
    elif args.classes_file:
        with open(args.classes_file, encoding="utf-8") as fh:
            text = fh.read()
        names = json.loads(text) if args.classes_file.endswith(".json") else [l.strip() for l in text.splitlines()]
        names = [str(n).strip() for n in names if str(n).strip()]
    else:
        return None
    if not names:
        raise ZeroShotError("--classes/--classes-file names no class")
    return names


def class_names_for(corpus: Corpus, given: Optional[list[str]]) -> Optional[list[str]]:
    """The names put into the prompts, in label order; None for a shard set without class names (then its
    samples must not carry labels)."""
    from data_pipelines.metadata import read_classes

    if corpus.kind == "folder":
        if given is not None and len(given) != len(corpus.folder_classes):
            raise ZeroShotError(f"{len(given)} class names given but {corpus.source} has {len(corpus.folder_classes)} "
                                f"class sub-directories ({', '.join(corpus.folder_classes[:5])}, ...); name them all, "
                                "in sorted order")
        return given or [c.replace("_", " ") for c in corpus.folder_classes]
    if given is not None:
        return given
    names = read_classes(corpus.shards)
    return [n.replace("_", " ") for n in names] if names else None


# -- the model ---------------------------------------------------------------------------------------------------
def load_clip(ckpt: str, tokenizer_path: Optional[str] = None, trust: bool = False):
    """(CLIP model in eval mode, caption tokenizer, CheckpointInfo); refuses anything but a CLIP checkpoint."""
    from data_pipelines.tokenizer import CaptionTokenizer
    from vit_experiments.checkpoints import read_checkpoint

    try:
        info = read_checkpoint(ckpt, trust=trust)
    except (FileNotFoundError, ValueError) as err:
        raise ZeroShotError(str(err)) from err
    if info.family != "clip":
        what = {"vit": "a ViT/DeiT classifier", "resnet": "a ResNet classifier"}.get(info.family, "not a CLIP model")
        raise ZeroShotError(f"{ckpt} is {what} ({info.describe()}): zero-shot classification needs a CLIP checkpoint, "
                            "with an image and a text tower (`vitx fit --config conf/clip/...`)")
    if info.config is None:
        raise ZeroShotError(f"{ckpt} holds bare CLIP weights without an architecture; give a checkpoint written by "
                            "`vitx fit`")
    if tokenizer_path:
        tokenizer = CaptionTokenizer.load(tokenizer_path)
    elif info.tokenizer:
        tokenizer = CaptionTokenizer.from_str(info.tokenizer)
    else:
        raise ZeroShotError(f"{ckpt} carries no caption tokenizer; give --tokenizer FILE (the one it was trained with)")
    text = info.config.text
    if tokenizer.vocab_size > text.vocab_size or tokenizer.context_length > text.context_length:
        raise ZeroShotError(f"the tokenizer ({tokenizer.vocab_size} tokens, context {tokenizer.context_length}) does "
                            f"not fit the text tower ({text.vocab_size} tokens, context {text.context_length})")
    return info.build().eval(), tokenizer, info


# -- the evaluation ----------------------------------------------------------------------------------------------
def _batches(corpus: Corpus, size: int, crop_pct: float, batch_size: int, limit: Optional[int], workers: int,
             skipped: list):
    """(uint8 (b, 3, size, size), labels, captions, names) batches; undecodable images are reported and
    appended to `skipped`."""
    from data_pipelines.transforms import decode_eval

    def decode(item):
        name, data, label, captions = item
        try:
            return name, decode_eval(data, size, crop_pct), label, captions
        except Exception as err:  # a corrupt image is a reported skip, never a crash
            print(f"{PROG}: skipping {name}: {type(err).__name__}: {err}", file=sys.stderr)
            skipped.append(f"{name}: {type(err).__name__}")
            return None

    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    pending: list = []

    def flush():
        done = [d for d in (pool.map(decode, pending) if pool else map(decode, pending)) if d is not None]
        pending.clear()
        if done:
            images = torch.from_numpy(np.stack([d[1] for d in done])).permute(0, 3, 1, 2)
            return images.contiguous(), [d[2] for d in done], [d[3] for d in done], [d[0] for d in done]
        return None

    try:
        for item in corpus.samples(limit, skipped):
            pending.append(item)
            if len(pending) == batch_size:
                out = flush()
                if out:
                    yield out
        if pending:
            out = flush()
            if out:
                yield out
    finally:
        if pool:
            pool.shutdown()


@torch.inference_mode()
def evaluate(model, tokenizer, corpus: Corpus, class_names: Optional[list[str]], templates: Sequence[str], *,
             normalization: tuple[Sequence[float], Sequence[float]], device: torch.device, batch_size: int = 256,
             num_images: Optional[int] = None, crop_pct: float = 1.0, precision: str = "32",
             retrieval: bool = True, workers: int = 1) -> dict:
    """Zero-shot accuracy (and retrieval recall) of a CLIP `model` on `corpus`; see the module docstring."""
    from data_pipelines.transforms import normalize
    from vit_experiments.evaluation import retrieval_chance, retrieval_recall, topk_accuracy, zeroshot_classifier
    from vit_experiments.evaluation import zeroshot_logits

    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    model = model.to(device)
    mean, std = normalization
    size = model.cfg.vision.image_size

    def encode_text(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device)).float()

    feats, labels, captions, names, skipped = [], [], [], [], []
    with autocast:
        for images, lab, caps, nm in _batches(corpus, size, crop_pct, batch_size, num_images, workers, skipped):
            feats.append(model.encode_image(normalize(images.to(device), mean, std)).float().cpu())
            labels += lab
            captions += caps
            names += nm
    if not feats:
        raise ZeroShotError(f"no image of {corpus.source} could be read")
    feats = torch.cat(feats)  # (N, E)
    result: dict = {"num_images": len(names), "num_skipped": len(skipped), "skipped": skipped[:100],
                    "image_names": names}
    labelled = [lab is not None for lab in labels]
    if any(labelled):
        if not all(labelled):
            raise ZeroShotError(f"{sum(labelled)} of the {len(labels)} samples of {corpus.source} carry a `cls` label "
                                "and the others do not")
        if not class_names:
            raise ZeroShotError(f"no class names for {corpus.source}: its samples carry labels but there is no "
                                "classes.json beside the shards; give --classes a,b,c or --classes-file FILE")
        if len(set(class_names)) != len(class_names):
            raise ZeroShotError(f"class names repeat: {sorted({n for n in class_names if class_names.count(n) > 1})}")
        y = torch.tensor(labels)
        if int(y.min()) < 0 or int(y.max()) >= len(class_names):
            raise ZeroShotError(f"labels run from {int(y.min())} to {int(y.max())} but {len(class_names)} class "
                                "names are given")
        with autocast:
            classifier = zeroshot_classifier(encode_text, class_names, templates, batch_size=batch_size).cpu()
        logits = zeroshot_logits(feats, classifier)  # (N, C)
        acc = topk_accuracy(logits, y, ks=(1, 5))
        pred = logits.argmax(1)
        C = len(class_names)
        per_class = {}
        for c, name in enumerate(class_names):
            rows = y == c
            per_class[name] = {"num_images": int(rows.sum()),
                               "acc1": float((pred[rows] == c).float().mean()) if rows.any() else None}
        result["classification"] = {
            "acc1": acc[1], "acc5": acc[5], "chance": {"acc1": 1.0 / C, "acc5": min(5, C) / C},
            "num_classes": C, "class_names": list(class_names), "per_class": per_class,
        }
    elif not any(c for c in captions):
        raise ZeroShotError(f"{corpus.source} has no class labels (`cls`) and no captions (`txt`): nothing to score")
    if retrieval and captions and all(c for c in captions):
        flat = [c for caps in captions for c in caps]
        owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        with autocast:
            text = torch.cat([encode_text(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)]).cpu()
        ks = (1, 5, 10)
        recall = retrieval_recall(feats, text, owner, ks=ks)
        result["retrieval"] = {"num_captions": len(flat), **recall, "mean_recall": sum(recall.values()) / len(recall),
                               "chance": retrieval_chance(owner, len(names), ks)}
    return result


# -- the command -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from vit_experiments.evaluation.templates import TEMPLATE_SETS

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Zero-shot classification accuracy (top-1, top-5) of a CLIP checkpoint on a labelled corpus, and "
                    "image-text retrieval recall when the corpus has captions.")
    p.add_argument("--ckpt", required=True, help="a CLIP checkpoint written by vitx fit (RUN/checkpoints/last.ckpt)")
    p.add_argument("--images", required=True,
                   help="a folder of class sub-directories (FOLDER/<class>/*.jpg), a folder of WebDataset shards "
                        "(val-*.tar preferred) or a shard pattern ('data/x/val-{000000..000003}.tar')")
    p.add_argument("--classes", help="class names in label order, comma-separated (default: the folder's "
                                     "sub-directories or classes.json beside the shards)")
    p.add_argument("--classes-file", help="class names in label order: one per line, or a JSON list (.json)")
    p.add_argument("--templates", default="photo",
                   help=f"prompt templates: one of {', '.join(TEMPLATE_SETS)}, or a file with one template per line "
                        "('{}' where the class name goes); default: photo")
    p.add_argument("--num-images", type=int, default=None, help="score at most this many images (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="images (and prompts) per forward (default 256)")
    p.add_argument("--crop-pct", type=float, default=1.0,
                   help="centre crop as a share of the shorter side (default 1.0: resize + centre crop, as CLIP)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--precision", choices=("32", "bf16", "16"), default="32",
                   help="32 (default), or autocast to bf16/16")
    p.add_argument("--tokenizer", help="caption tokenizer JSON, for a checkpoint that carries none")
    p.add_argument("--no-retrieval", action="store_true", help="skip retrieval even when the samples have captions")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-decoding threads")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (only for files you trust)")
    return p


def summary_text(result: dict) -> str:
    lines = [f"{result['checkpoint']}: {result['num_images']} images of {result['images']}"
             + (f" ({result['num_skipped']} skipped: unreadable)" if result["num_skipped"] else "")]
    cls = result.get("classification")
    if cls:
        lines.append(f"zero-shot over {cls['num_classes']} classes, {result['num_templates']} templates "
                     f"({result['templates']}): acc1 {cls['acc1']:.4f}  acc5 {cls['acc5']:.4f}  "
                     f"(chance {cls['chance']['acc1']:.4f}, {cls['chance']['acc5']:.4f})")
        worst = sorted(((v["acc1"], k) for k, v in cls["per_class"].items() if v["acc1"] is not None))
        if len(worst) > 1:
            shown = lambda xs: ", ".join(f"{k} {a:.2f}" for a, k in xs)  # noqa: E731
            lines.append(f"  weakest classes: {shown(worst[:3])};  strongest: {shown(worst[::-1][:3])}")
    ret = result.get("retrieval")
    if ret:
        ks = sorted({int(k.split("@")[1]) for k in ret if "@" in k and k != "chance"})
        for d in ("image_to_text", "text_to_image"):
            lines.append(f"retrieval {d} over {ret['num_captions']} captions: "
                         + "  ".join(f"R@{k} {ret[f'{d}/R@{k}']:.4f}" for k in ks))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    from data_pipelines.transforms import CLIP_MEAN, CLIP_STD
    from vit_experiments.evaluation.templates import get_templates

    if args.num_images is not None and args.num_images < 1:
        raise ZeroShotError("--num-images must be >= 1")
    if args.batch_size < 1:
        raise ZeroShotError("--batch-size must be >= 1")
    if not 0.0 < args.crop_pct <= 1.0:
        raise ZeroShotError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    templates = get_templates(args.templates)
    model, tokenizer, info = load_clip(args.ckpt, args.tokenizer, args.trust_checkpoint)
    corpus = open_corpus(args.images)
    class_names = class_names_for(corpus, _given_classes(args))
    first = next(corpus.samples(1), None)
    if first is None:
        raise ZeroShotError(f"{args.images} holds no image")
    if first[2] is not None and not class_names:  # labelled samples, nothing to call the labels: fail before encoding
        raise ZeroShotError(f"no class names for {args.images}: its samples carry `cls` labels but there is no "
                            "classes.json beside the shards; give --classes a,b,c or --classes-file FILE")
    saved = info.normalization or {}
    if not saved:
        print(f"{PROG}: the checkpoint names no mean/std; using CLIP's", file=sys.stderr)
    mean, std = saved.get("mean", CLIP_MEAN), saved.get("std", CLIP_STD)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = evaluate(model, tokenizer, corpus, class_names, templates, normalization=(mean, std), device=device,
                      batch_size=args.batch_size, num_images=args.num_images, crop_pct=args.crop_pct,
                      precision=args.precision, retrieval=not args.no_retrieval, workers=args.workers)
    head = {"checkpoint": os.path.abspath(args.ckpt), "images": args.images, "corpus": corpus.kind,
            "shards": corpus.shards, "templates": args.templates, "num_templates": len(templates),
            "template_list": templates, "crop_pct": args.crop_pct, "precision": args.precision,
            "normalization": {"mean": list(mean), "std": list(std)}, "epoch": info.epoch,
            "global_step": info.global_step, "device": str(device)}
    return {**head, **result}


def main_zeroshot(argv: Optional[Sequence[str]] = None) -> int:
    """`vitx zeroshot ...`: 0 on success, 2 on a problem with the arguments, checkpoint or corpus."""
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (ZeroShotError, FileNotFoundError, ValueError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    print(summary_text(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")
    return 0
