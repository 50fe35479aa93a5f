"""Prompt-template sets for zero-shot classification, by name (`vitx zeroshot --templates NAME`).

    clip-imagenet-80  the 80 templates of the CLIP paper's ImageNet ensemble (Radford et al. 2021, sec. 3.1.4;
                      openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb), in the notebook's order
    clip-imagenet-7   the 7 of them the notebook selects as nearly as good as all 80
    simple            "a photo of a {}." alone, the paper's baseline prompt
    photo             vit_experiments.evaluation.DEFAULT_TEMPLATES: 8 of the 80 for photographs (the default of
                      the ZeroShotEvaluation callback)
    shapes            the 8 of conf/clip/demo.yaml, for the synthetic shapes corpus (not photographs)

Every template holds exactly one "{}" for the class name.
"""

from __future__ import annotations

import os
from typing import Sequence

from .zeroshot import DEFAULT_TEMPLATES

CLIP_IMAGENET_80: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# the notebook's selection, found by sequential forward selection over the 80 on ImageNet
CLIP_IMAGENET_7: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

SIMPLE: tuple[str, ...] = ("a photo of a {}.",)

# conf/clip/demo.yaml's ZeroShotEvaluation templates: the captions there read "a small red star in the ..."
SHAPES: tuple[str, ...] = (
    "a {}.", "a picture of a {}.", "there is a {}.", "a small {}.", "a large {}.", "a red {}.", "a blue {}.",
    "a {} in the centre.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "clip-imagenet-80": CLIP_IMAGENET_80,
    "clip-imagenet-7": CLIP_IMAGENET_7,
    "simple": SIMPLE,
    "photo": tuple(DEFAULT_TEMPLATES),
    "shapes": SHAPES,
}


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    templates = list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{where}: every prompt template needs exactly one '{{}}' for the class name; "
                         f"bad: {bad or 'none given'}")
    return templates


def get_templates(name_or_path: str) -> list[str]:
    """A template set by name (TEMPLATE_SETS), or read from a text file with one template per line (blank lines
    and lines starting with '#' skipped)."""
    if name_or_path in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[name_or_path])
    if os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
        return check_templates([t for t in lines if t and not t.startswith("#")], name_or_path)
    raise ValueError(f"unknown template set {name_or_path!r}: choose one of {', '.join(TEMPLATE_SETS)}, or give a "
                     "text file with one template per line")
