"""Image decoding and preprocessing: encoded bytes to a uint8 CHW tensor ready for one model.

Decoding is defensive: size limits are checked on the header before any pixel is decoded, JPEGs
are decoded at a reduced scale when the model needs far fewer pixels (libjpeg's DCT scaling),
EXIF orientation is honoured, and every mode (greyscale, palette, alpha, CMYK, 16-bit) becomes
8-bit RGB. Normalisation (mean/std) happens later, on the model's device, in batches.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidArgument, ResourceExhausted
from services.encoder.registry import Preprocess

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; transparent pixels are composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            scale = 255.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0
            arr8 = np.clip(np.nan_to_num(arr) * scale, 0, 255)
        elif arr.dtype.itemsize > 1 and int(arr.max(initial=0)) > 255:
            arr8 = arr.astype(np.float32) / 257.0  # 16-bit range [0, 65535] onto [0, 255]
        else:
            arr8 = np.clip(arr, 0, 255)
        return Image.fromarray(np.rint(arr8).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def decode(data: bytes, *, max_bytes: int, max_pixels: int, min_short_side: int = 0) -> Image.Image:
    """Decodes encoded image bytes into an upright 8-bit RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, GIF (first frame), TIFF, BMP...).
        max_bytes: larger inputs are refused before decoding.
        max_pixels: images with more than this many pixels (width x height) are refused from
            their header, before decoding (decompression bombs).
        min_short_side: when > 0, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as its
            shorter side stays at least this many pixels (the model's resize target).

    Raises:
        InvalidArgument: empty input, not an image, truncated or corrupt data.
        ResourceExhausted: over ``max_bytes`` or ``max_pixels``.
    """
    if not data:
        raise InvalidArgument("empty image (0 bytes)")
    if len(data) > max_bytes:
        raise ResourceExhausted(f"image is {len(data)} bytes, over the limit of {max_bytes} bytes")
    fmt = "unknown format"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                raise InvalidArgument(f"image has an empty size {width}x{height}")
            if width * height > max_pixels:
                raise ResourceExhausted(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} pixels")
            fmt = img.format or fmt
            if min_short_side and img.format == "JPEG":
                scale = min_short_side / min(width, height)
                if scale < 1:
                    img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))
            img.load()
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            return _to_rgb(upright)
    except Image.DecompressionBombError as exc:
        raise ResourceExhausted(f"image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidArgument(f"not a recognised image format ({len(data)} bytes)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise InvalidArgument(f"cannot decode {fmt} image: {exc}") from exc


def resize_and_crop(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Resizes the shorter side to ``pre.resize`` and centre-crops ``pre.crop`` (as torchvision's
    ``Resize(int)`` + ``CenterCrop``); returns a uint8 tensor of shape (3, crop, crop)."""
    width, height = img.size
    if width <= height:
        new_w, new_h = pre.resize, int(pre.resize * height / width)
    else:
        new_w, new_h = int(pre.resize * width / height), pre.resize
    img = img.resize((new_w, new_h), resample=_RESAMPLE[pre.interpolation])
    left = round((new_w - pre.crop) / 2.0)
    top = round((new_h - pre.crop) / 2.0)
    img = img.crop((left, top, left + pre.crop, top + pre.crop))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_tensor(data: bytes, pre: Preprocess, *, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """``decode`` then ``resize_and_crop``: encoded bytes to the model's uint8 (3, crop, crop) input."""
    img = decode(data, max_bytes=max_bytes, max_pixels=max_pixels, min_short_side=pre.resize)
    return resize_and_crop(img, pre)
