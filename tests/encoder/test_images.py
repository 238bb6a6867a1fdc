"""Decoding and preprocessing: formats, modes, orientation, and refusals of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidArgument, ResourceExhausted
from services.encoder.images import decode, load_tensor, resize_and_crop
from services.encoder.registry import Preprocess
from tests.encoder.images import encode, gradient, jpeg, png_bomb

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 50_000_000}
PRE = Preprocess(resize=256, crop=224)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_rgb(fmt: str) -> None:
    img = decode(encode(gradient(), fmt), **LIMITS)
    assert img.mode == "RGB" and img.size == (320, 240)
    # The red marker survives every codec (GIF palettes and JPEG included).
    r, g, b = img.getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    _, g, b = decode(data, **LIMITS).getpixel((32, 32))
    assert b > 200 and g < 50


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    arr = np.full((40, 60), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    img = decode(encode(Image.fromarray(arr), "PNG"), **LIMITS)
    assert img.mode == "RGB"
    assert abs(img.getpixel((5, 5))[0] - 128) <= 1  # 32768 / 257 = 127.5, not saturated at 255


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(gradient(mode="CMYK"), "JPEG", quality=95)
    r, g, b = decode(data, **LIMITS).getpixel((10, 10))
    assert r > 180 and g < 80 and b < 80


def test_greyscale_and_alpha() -> None:
    grey = decode(encode(gradient(mode="L"), "PNG"), **LIMITS)
    assert grey.mode == "RGB" and len(set(grey.getpixel((100, 100)))) == 1
    transparent = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    assert decode(encode(transparent, "PNG"), **LIMITS).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_honoured() -> None:
    img = gradient(320, 240)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    upright = decode(encode(img, "JPEG", exif=exif.tobytes(), quality=95), **LIMITS)
    assert upright.size == (240, 320)
    # The red marker (top-left in storage) is top-right once rotated clockwise.
    assert upright.getpixel((230, 10))[0] > 200 and upright.getpixel((10, 10))[0] < 100


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_target() -> None:
    data = jpeg(4000, 3000)
    img = decode(data, min_short_side=256, **LIMITS)
    assert min(img.size) >= 256 and img.size[0] < 4000  # DCT scaling kicked in
    tensor = load_tensor(data, PRE, **LIMITS)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.uint8


def test_resize_and_crop_matches_torchvision() -> None:
    from torchvision.transforms import v2

    img = gradient(301, 217)
    ours = resize_and_crop(img, PRE)
    ref = v2.Compose([v2.PILToTensor(), v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC,
                                                    antialias=True), v2.CenterCrop(224)])(img)
    assert ours.shape == ref.shape == (3, 224, 224)
    # PIL and torchvision resample slightly differently; geometry must agree to the pixel.
    assert (ours.int() - ref.int()).abs().float().mean() < 2.0


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", InvalidArgument, "empty"),
        (b"this is not an image at all", InvalidArgument, "not a recognised image"),
        (jpeg()[:2000], InvalidArgument, "cannot decode JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, InvalidArgument, "cannot decode|not a recognised"),
    ],
    ids=["empty", "text", "truncated-jpeg", "broken-png"],
)
def test_bad_bytes_are_invalid_argument(data: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        decode(data, **LIMITS)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = png_bomb()
    assert len(bomb) < 1_000_000  # 400 megapixels in well under a megabyte
    with pytest.raises(ResourceExhausted, match="decompression bomb"):
        decode(bomb, **LIMITS)


def test_pixel_limit_is_ours_below_pillows_own() -> None:
    with pytest.raises(ResourceExhausted, match="12000x10000 = 120000000 pixels, over the limit of 50000000"):
        decode(png_bomb(12000, 10000), **LIMITS)


def test_oversize_payload_is_refused_before_decoding() -> None:
    with pytest.raises(ResourceExhausted, match="over the limit of 1000 bytes"):
        decode(jpeg(), max_bytes=1000, max_pixels=10**8)
