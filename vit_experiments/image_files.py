"""Image files on disk, as `vitx analyze` and `vitx zeroshot` take them with `--images FOLDER`."""
from __future__ import annotations

import os

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_files(directory: str) -> list[str]:
    """Every image under `directory` (recursively, by extension, any letter case), sorted by path."""
    files = []
    for root, _, names in os.walk(directory):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)
