"""Sample datasets that ship inside installed packages, written out in the list_of_images.txt format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIGITS_SIDE = 64  # px; the 8x8 originals are enlarged so that they survive the encoders' resize


def write_digits(root: Path) -> Path:
    """Writes scikit-learn's handwritten digits (1,797 images, 10 classes, from the UCI ML repository)
    as PNG files with a ``list_of_images.txt``; returns ``root``. Does nothing if already complete."""
    from PIL import Image
    from sklearn.datasets import load_digits

    listing = root / "list_of_images.txt"
    digits = load_digits()
    if listing.is_file() and len(listing.read_text().splitlines()) == len(digits.target):
        return root
    lines = []
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        rel = f"images/{target}/{i:04d}.png"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        grey = np.uint8(255 - np.clip(pixels / 16.0 * 255.0, 0, 255))  # dark ink on white, like a scan
        Image.fromarray(grey, "L").resize((DIGITS_SIDE, DIGITS_SIDE), Image.Resampling.BICUBIC).save(path)
        lines.append(f"{rel}\tdigit-{target}")
    tmp = listing.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(listing)
    return root
