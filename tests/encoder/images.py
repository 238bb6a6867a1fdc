"""Encoded test images made on the fly (no binary fixtures in the repository)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 320, height: int = 240, mode: str = "RGB") -> Image.Image:
    """A deterministic colour gradient with a marker block in the top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (x + y) * 255 // max(width + height - 2, 1)], axis=-1).astype(np.uint8)
    arr[: height // 4, : width // 4] = (255, 0, 0)
    return Image.fromarray(arr, "RGB").convert(mode)


def jpeg(width: int = 320, height: int = 240) -> bytes:
    return encode(gradient(width, height), "JPEG", quality=90)


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid greyscale PNG of width x height that is tiny on the wire (all zeros, deflated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw_row = b"\x00" + b"\x00" * width
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(raw_row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
