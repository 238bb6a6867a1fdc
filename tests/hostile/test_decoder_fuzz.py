"""The image decoder (``decode``, ``load_tensor``) under generated images: every format, mode, size
(1 x N included) and EXIF orientation PIL can write, byte-mutated, truncated, and random bytes. It
returns the model's uint8 (3, crop, crop) input or refuses with InvalidArgument or ResourceExhausted
and a sentence, within a bounded time; never any other exception."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from services.common.errors import InvalidArgument, ResourceExhausted
from services.encoder.images import load_tensor
from services.encoder.registry import Preprocess
from tests.hostile.bad_images import seed_images
from tests.hostile.conftest import decoder_cases, fuzz_settings
from tests.hostile.harness import Case, Ledger, message_problems
from tests.hostile.wire import junk, mutated, weighted

# PIL warns about the corrupt files it reads (that is what this test feeds it).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")
LIMITS = {"max_bytes": 256 * 1024, "max_pixels": 4_000_000, "max_aspect_ratio": 50.0}
PREPROCESS = [Preprocess(resize=32, crop=28), Preprocess(resize=28, crop=28, resize_mode="squash"),
              Preprocess(resize=28, crop=28, resize_mode="longest", interpolation="bilinear")]
SECONDS_PER_IMAGE = 5.0
_MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr"]
_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "PCX", "JPEG2000"]


@st.composite
def made_images(draw: st.DrawFn) -> bytes:
    """An image PIL writes: mode, size (slivers included), format, EXIF orientation; b"" if PIL cannot."""
    width = draw(st.one_of(st.integers(1, 64), st.sampled_from([1, 2, 49, 50, 51, 300, 3000])))
    height = draw(st.one_of(st.integers(1, 64), st.sampled_from([1, 2, 49, 50, 51, 300, 3000])))
    pixels = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    mode = draw(st.sampled_from(_MODES))
    img = img.convert(mode) if mode not in ("I;16",) else Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = draw(st.integers(0, 9))
    buf = io.BytesIO()
    try:
        img.save(buf, format=draw(st.sampled_from(_FORMATS)), exif=exif.tobytes())
    except (OSError, ValueError, KeyError, TypeError):
        return b""  # a mode the format cannot store: nothing to send
    return buf.getvalue()


def images() -> st.SearchStrategy[tuple[str, bytes]]:
    made = made_images()
    truncated = st.tuples(made, st.integers(0, 2**20)).map(lambda t: ("truncated", t[0][: t[1] % (len(t[0]) + 1)]))
    return weighted((3, made.map(lambda d: ("made", d))),
                    (4, mutated(seed_images()).map(lambda d: ("mutated", d))), (2, truncated),
                    (1, junk().map(lambda d: ("junk", d))))


def test_decoder_survives_hostile_images(ledger: Ledger) -> None:
    done = 0

    @fuzz_settings(decoder_cases())
    @given(image=images(), pre=st.sampled_from(PREPROCESS))
    def attack(image: tuple[str, bytes], pre: Preprocess) -> None:
        nonlocal done
        kind, data = image
        problems: list[str] = []
        start = time.monotonic()
        outcome = "OK"
        try:
            tensor = load_tensor(data, pre, **LIMITS)  # type: ignore[arg-type]
            if tuple(tensor.shape) != (3, pre.crop, pre.crop) or str(tensor.dtype) != "torch.uint8":
                problems.append(f"a tensor of shape {tuple(tensor.shape)} and dtype {tensor.dtype}")
        except (InvalidArgument, ResourceExhausted) as exc:
            outcome = exc.code.name
            problems += message_problems(exc.message)
        except Exception as exc:  # the invariant under test: nothing else ever escapes
            outcome = type(exc).__name__
            problems.append(f"{type(exc).__name__}: {exc}"[:300])
        seconds = time.monotonic() - start
        if seconds > SECONDS_PER_IMAGE:
            problems.append(f"{seconds:.1f} s for one image of {len(data)} bytes")
        done += 1
        ledger.record("decoder", Case(kind, (data,)), outcome, seconds, problems)

    attack()
    assert done >= decoder_cases()
    found = ledger.violations_of("decoder")
    assert not found, f"{len(found)} kinds of violation:\n" + "\n".join(found)
