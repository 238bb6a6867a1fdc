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

# Largest intermediate image of an exact resize-then-crop (4 MP, 12 MB of RGB): at 256 px that is an
# aspect ratio of 64:1; beyond it only the crop's region is resampled (see ``resize_and_crop``).
FULL_RESIZE_MAX_PIXELS = 4 * 1024 * 1024

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


def decode(data: bytes, *, max_bytes: int, max_pixels: int, min_short_side: int = 0,
           max_aspect_ratio: float = 0) -> Image.Image:
    """Decodes encoded image bytes into an upright 8-bit RGB image.

    Args:
        data: the encoded file (JPEG, PNG, WebP, GIF (first frame), TIFF, BMP...).
        max_bytes: larger inputs are refused before decoding.
        max_pixels: images with more than this many pixels (width x height) are refused from
            their header, before decoding (decompression bombs).
        min_short_side: when > 0, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as its
            shorter side stays at least this many pixels (the model's resize target).
        max_aspect_ratio: images whose longer side is more than this many times the shorter one are
            refused from their header (0: no limit).

    Raises:
        InvalidArgument: empty input, not an image, truncated or corrupt data, absurd aspect ratio.
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
            check_aspect_ratio(width, height, max_aspect_ratio)
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


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def resize_and_crop(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """The model's input square, as a uint8 tensor of shape (3, crop, crop), by ``pre.resize_mode``:

    - ``shortest``: the shorter side resized to ``pre.resize``, then the centred ``crop`` square (as
      torchvision's ``Resize(int)`` + ``CenterCrop``). When the resized image would exceed
      ``FULL_RESIZE_MAX_PIXELS`` (a 1 x 16000 image would become 256 x 4,096,000), only the source
      region that lands in the crop is resampled (PIL's ``resize(box=...)``), so the work is bounded
      by the crop. That path is not bit-identical (PIL places its filter taps a little differently:
      up to a few grey levels at sharp edges), hence the exact path for every ordinary image.
    - ``squash``: both sides resized to ``crop``, ignoring the aspect ratio.
    - ``longest``: the longer side resized to ``crop``, then padded with black to a centred square.
    """
    width, height = img.size
    resample = _RESAMPLE[pre.interpolation]
    if pre.resize_mode == "squash":
        return _to_tensor(img.resize((pre.crop, pre.crop), resample=resample))
    if pre.resize_mode == "longest":
        scale = pre.crop / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new("RGB", (pre.crop, pre.crop))
        canvas.paste(img.resize((new_w, new_h), resample=resample),
                     ((pre.crop - new_w) // 2, (pre.crop - new_h) // 2))
        return _to_tensor(canvas)
    if width <= height:
        new_w, new_h = pre.resize, int(pre.resize * height / width)
    else:
        new_w, new_h = int(pre.resize * width / height), pre.resize
    left = round((new_w - pre.crop) / 2.0)
    top = round((new_h - pre.crop) / 2.0)
    if new_w * new_h <= FULL_RESIZE_MAX_PIXELS or left < 0 or top < 0:
        # Exact; also for a crop larger than the resized image (PIL pads with black, as torchvision).
        img = img.resize((new_w, new_h), resample=resample)
        return _to_tensor(img.crop((left, top, left + pre.crop, top + pre.crop)))
    sx, sy = new_w / width, new_h / height
    box = (left / sx, top / sy, (left + pre.crop) / sx, (top + pre.crop) / sy)
    return _to_tensor(img.resize((pre.crop, pre.crop), resample=resample, box=box))


def check_aspect_ratio(width: int, height: int, max_ratio: float) -> None:
    """Refuses an image whose longer side is more than ``max_ratio`` times its shorter one (0: no
    limit): its centred square would show a sliver of it stretched, never what it depicts."""
    ratio = max(width, height) / min(width, height)
    if max_ratio and ratio > max_ratio:
        raise InvalidArgument(f"image is {width}x{height}: its aspect ratio {ratio:.0f}:1 is over the limit of "
                              f"{max_ratio:g}:1")


def load_tensor(data: bytes, pre: Preprocess, *, max_bytes: int, max_pixels: int,
                max_aspect_ratio: float = 0) -> torch.Tensor:
    """``decode`` then ``resize_and_crop``: encoded bytes to the model's uint8 (3, crop, crop) input.

    Raises:
        InvalidArgument: not an image, or an aspect ratio over ``max_aspect_ratio`` (0: no limit).
        ResourceExhausted: over ``max_bytes`` or ``max_pixels``.
    """
    img = decode(data, max_bytes=max_bytes, max_pixels=max_pixels,
                 min_short_side=pre.resize if pre.resize_mode == "shortest" else pre.crop,
                 max_aspect_ratio=max_aspect_ratio)
    return resize_and_crop(img, pre)
