"""Hand-made bad and unusual images, each with its expected per-item outcome, embedded through the
running encoder (dinov2-micro: resize 32, crop 28; at most 256 KiB and 4 MP an image, aspect ratio 50:1).
One bad image never sinks its batch, and its error says which image and what was wrong."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from PIL import Image
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc

from tests.encoder.images import encode, gradient, jpeg
from tests.hostile import bad_images as bad
from tests.hostile.servers import MICRO, Platform

OK = grpc.StatusCode.OK
IA, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED

# name: (how the image is made, expected code, a fragment of the message after "image 1 of 3: ")
CORPUS: dict[str, tuple[Callable[[], bytes], grpc.StatusCode, str]] = {
    "truncated JPEG": (bad.truncated_jpeg, IA, "cannot decode JPEG image: image file is truncated"),
    "PNG decompression bomb (5000 x 5000)": (lambda: bad.png_bomb(5000, 5000), RE,
                                             "image is 5000x5000 = 25000000 pixels, over the limit of 4000000 pixels"),
    "PNG header claiming 100000 x 100000": (lambda: bad.png_header_only(100_000, 100_000), RE,
                                            "image refused as a decompression bomb"),
    "1 x 16000 (aspect ratio)": (lambda: bad.solid_png(1, 16000), IA,
                                 "image is 1x16000: its aspect ratio 16000:1 is over the limit of 50:1"),
    "16000 x 1 (aspect ratio)": (lambda: bad.solid_png(16000, 1), IA,
                                 "image is 16000x1: its aspect ratio 16000:1 is over the limit of 50:1"),
    "zero bytes": (lambda: b"", IA, "empty image (0 bytes)"),
    "random bytes": (bad.random_bytes, IA, "not a recognised image format (4096 bytes)"),
    "over --max-image-bytes": (lambda: bad.noisy_png(300 * 1024), RE, "over the limit of 262144 bytes"),
    "PNG with a broken header CRC": (bad.png_bad_crc, IA, "not a recognised image format"),
    "PNG header without pixel data": (lambda: bad.png_header_only(64, 48), IA, "cannot decode PNG image"),
    "PNG of width 0": (lambda: bad.png_header_only(0, 10), IA, "not a recognised image format"),
    "SVG (not a raster format)": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', IA,
                                  "not a recognised image format"),
    "HTML page": (lambda: b"<!doctype html><html><body>not an image</body></html>", IA,
                  "not a recognised image format"),
    "1 x 40 (within the ratio)": (lambda: bad.solid_png(1, 40), OK, ""),
    "CMYK JPEG": (bad.cmyk_jpeg, OK, ""),
    "16-bit PNG": (bad.png16, OK, ""),
    "animated GIF": (bad.animated_gif, OK, ""),
    "EXIF-rotated JPEG": (bad.exif_rotated, OK, ""),
    "palette + alpha PNG": (bad.palette_alpha_png, OK, ""),
    "32-bit float TIFF": (bad.float_tiff, OK, ""),
    "1-bit PNG": (bad.bilevel_png, OK, ""),
    **{fmt.upper(): (functools.partial(bytes, data), OK, "") for fmt, data in bad.formats().items()
       if fmt in ("webp", "tiff", "bmp", "ico", "ppm", "tga")},
}


def _embed(platform: Platform, images: list[bytes]) -> encoder_pb2.EmbedImagesResponse:
    stub = encoder_pb2_grpc.EncoderServiceStub(platform.channels["encoder"])
    request = encoder_pb2.EmbedImagesRequest(model=MICRO.id, images=[encoder_pb2.Image(data=d) for d in images])
    return stub.EmbedImages(request, timeout=30)


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_image_fails_alone_and_says_why(name: str, platform: Platform) -> None:
    make, code, fragment = CORPUS[name]
    good = jpeg(48, 40)
    results = _embed(platform, [good, make(), good]).results  # between two good images
    assert [r.id for r in results] == ["0", "1", "2"]
    for neighbour in (results[0], results[2]):
        assert math.isclose(float(np.linalg.norm(neighbour.vector.values)), 1.0, abs_tol=1e-4)
    item = results[1]
    if code == OK:
        assert item.HasField("vector"), item.error.message
        assert len(item.vector.values) == MICRO.dim
        assert math.isclose(float(np.linalg.norm(item.vector.values)), 1.0, abs_tol=1e-4)
    else:
        assert item.error.code == code.value[0], item.error.message
        assert item.error.message.startswith("image 1 of 3: "), item.error.message
        assert fragment in item.error.message


def test_exif_orientation_is_applied_before_embedding(platform: Platform) -> None:
    """An image stored sideways with EXIF orientation 6 embeds exactly as the upright image (lossless PNG)."""
    img = gradient(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = encode(img, "PNG", exif=exif.tobytes())
    upright = encode(img.transpose(Image.Transpose.ROTATE_270), "PNG")
    a, b = (np.asarray(r.vector.values) for r in _embed(platform, [sideways, upright]).results)
    assert np.allclose(a, b, atol=1e-6)
    assert not np.allclose(a, np.asarray(_embed(platform, [encode(img, "PNG")]).results[0].vector.values), atol=1e-3)
