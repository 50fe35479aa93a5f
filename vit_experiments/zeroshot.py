"""`vitx zeroshot`: zero-shot classification (and retrieval, when the corpus has captions) of a CLIP checkpoint on
any labelled corpus, without training.

    vitx zeroshot --ckpt RUN/checkpoints/last.ckpt --images FOLDER_OR_SHARDS [--classes a,b,c | --classes-file F]
                  [--templates clip-imagenet-80] [--num-images N] [--batch-size 256] [--device cuda] [--out OUT.json]
    vitx zeroshot --ckpt clip-vit-base-patch32/ --images FOLDER --templates clip-imagenet-80   # pretrained weights

The checkpoint is one written by `vitx fit`, or pretrained CLIP weights of another library, read with the
tokenizer beside them (vit_experiments.checkpoints.clip_readers: a Hugging Face CLIPModel folder, an open_clip
checkpoint or folder, an OpenAI state dict; `--tokenizer` names a tokenizer kept elsewhere, `--act`,
`--vision-heads`, `--text-heads` what the weights cannot tell).

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
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np
import torch

from vit_experiments.zeroshot_corpus import (  # noqa: F401  (the command's names, importable from here)
    PROG, Corpus, ZeroShotError, _given_classes, class_names_for, open_corpus,
)


# -- the model ---------------------------------------------------------------------------------------------------
def load_clip(ckpt: str, tokenizer_path: Optional[str] = None, trust: bool = False, **overrides):
    """(CLIP model in eval mode, caption tokenizer, CheckpointInfo); refuses anything but a CLIP checkpoint.
    `overrides` (act, vision_heads, text_heads) reach the readers of imported CLIPs (checkpoints.clip_readers)."""
    from data_pipelines.tokenizer import CaptionTokenizer
    from vit_experiments.checkpoints import read_checkpoint
    from vit_experiments.checkpoints.clip_readers import clip_overrides

    try:
        with clip_overrides(**overrides):
            info = read_checkpoint(ckpt, trust=trust)
    except (FileNotFoundError, ValueError) as err:
        raise ZeroShotError(str(err)) from err
    if info.family != "clip":
        what = {"vit": "a ViT/DeiT classifier", "resnet": "a ResNet classifier"}.get(info.family, "not a CLIP model")
        raise ZeroShotError(f"{ckpt} is {what} ({info.describe()}): zero-shot classification needs a CLIP checkpoint, "
                            "with an image and a text tower (`vitx fit --config conf/clip/...`)")
    if info.config is None:
        raise ZeroShotError(f"{ckpt} holds bare CLIP weights without an architecture; give a checkpoint written by "
                            "`vitx fit`, or pretrained weights in the Hugging Face, open_clip or OpenAI layout")
    for note in info.notes:
        print(f"{PROG}: {info.source}: {note}", file=sys.stderr)
    text = info.config.text
    try:
        if tokenizer_path:  # vitx's JSON, a tokenizer.json, OpenAI's merges file, or a folder with one
            tokenizer = CaptionTokenizer.load(tokenizer_path, context_length=text.context_length)
        elif info.tokenizer:
            tokenizer = CaptionTokenizer.from_str(info.tokenizer)
        else:
            raise ZeroShotError(f"{ckpt} carries no caption tokenizer; give --tokenizer FILE (the one it was trained "
                                "with, or the tokenizer.json / bpe_simple_vocab_16e6.txt.gz of pretrained weights)")
    except (FileNotFoundError, ValueError) as err:
        raise ZeroShotError(str(err)) from err
    if tokenizer.vocab_size > text.vocab_size or tokenizer.context_length > text.context_length:
        raise ZeroShotError(f"the tokenizer ({tokenizer.vocab_size} tokens, context {tokenizer.context_length}) does "
                            f"not fit the text tower ({text.vocab_size} tokens, context {text.context_length})")
    # the text tower reads each caption at its end token: the tokenizer must write the one the tower looks for
    if text.eot_pooling == "first" and tokenizer.eot_id != text.eot_token_id:
        raise ZeroShotError(f"the tokenizer's end token is {tokenizer.eot_id} but the text tower reads captions at "
                            f"{text.eot_token_id}: is it the tokenizer these weights were trained with?")
    if text.eot_pooling == "argmax" and tokenizer.eot_id != tokenizer.vocab_size - 1:
        raise ZeroShotError(f"the text tower reads captions at their highest token id, but this tokenizer's end token "
                            f"({tokenizer.eot_id}) is not its highest ({tokenizer.vocab_size - 1}): give the tokenizer "
                            "these weights were trained with")
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
    p.add_argument("--ckpt", required=True,
                   help="a CLIP checkpoint written by vitx fit (RUN/checkpoints/last.ckpt), or pretrained CLIP weights: "
                        "a Hugging Face CLIPModel folder, an open_clip checkpoint or folder, an OpenAI state dict")
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
    p.add_argument("--tokenizer",
                   help="the caption tokenizer, for weights without one beside them: vitx's JSON, a Hugging Face "
                        "tokenizer.json, OpenAI's bpe_simple_vocab_16e6.txt.gz, or a folder holding one")
    p.add_argument("--act", choices=("gelu", "gelu_tanh", "quick_gelu"),
                   help="imported CLIP weights: the MLP activation, over what the config (or the layout's default: "
                        "quick_gelu for OpenAI's, gelu for open_clip's) says")
    p.add_argument("--vision-heads", type=int, help="imported CLIP weights: the image tower's attention heads "
                                                    "(default: the config's, else width // 64)")
    p.add_argument("--text-heads", type=int, help="imported CLIP weights: the text tower's attention heads")
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
    model, tokenizer, info = load_clip(args.ckpt, args.tokenizer, args.trust_checkpoint, act=args.act,
                                       vision_heads=args.vision_heads, text_heads=args.text_heads)
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
