"""Hostile and unusual encoded images, made in code (no binary fixtures in the repository)."""

from __future__ import annotations

import random
import struct
import zlib

import numpy as np
from PIL import Image

from tests.encoder.images import encode, gradient


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid greyscale PNG of width x height (400 MP by default) that is tiny on the wire."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is missing."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")


def png_bad_crc() -> bytes:
    """A PNG whose header chunk fails its CRC."""
    data = bytearray(encode(gradient(40, 30), "PNG"))
    data[29] ^= 0xFF  # a byte of the IHDR chunk's CRC
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(gradient(320, 240), "JPEG", quality=90)
    return data[: len(data) // 2]


def solid_png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", (width, height), colour), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(gradient(64, 48, mode="CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    return encode(Image.fromarray(np.full((40, 60), 40000, dtype=np.uint16)), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (48, 48), colour) for colour in ((0, 0, 255), (0, 255, 0), (255, 0, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated(fmt: str = "JPEG") -> bytes:
    """An image stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(gradient(64, 48), fmt, exif=exif.tobytes())


def palette_alpha_png() -> bytes:
    return encode(gradient(48, 40).convert("P"), "PNG", transparency=0)


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20), "F"), "TIFF")


def bilevel_png() -> bytes:
    return encode(gradient(40, 40).convert("1"), "PNG")


def random_bytes(size: int = 4096, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def noisy_png(size: int, seed: int = 3) -> bytes:
    """An incompressible RGB PNG of about ``size`` bytes (3 bytes a pixel of noise)."""
    side = int((size / 3) ** 0.5) + 1
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGB"), "PNG")


def formats() -> dict[str, bytes]:
    """One small ordinary image per format the decoder must accept."""
    img = gradient(48, 40)
    return {fmt.lower(): encode(img, fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA")}


def seed_images() -> list[bytes]:
    """Valid images of many formats and modes: what the fuzzers start from and mutate."""
    return [*formats().values(), cmyk_jpeg(), png16(), animated_gif(), exif_rotated(), palette_alpha_png(),
            float_tiff(), bilevel_png(), solid_png(1, 40), solid_png(40, 1), encode(gradient(48, 40), "TIFF",
                                                                                  compression="tiff_lzw")]
