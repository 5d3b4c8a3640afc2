"""Stage 4, decode: every image kind and every bad input on real encoded files (Pillow-written
JPEG/PNG/GIF, skimage photos), plus the DecodeImages Beam wrapper."""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import random
import struct
import threading
import time
import tracemalloc
import zlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image
from skimage import data

from beam_jobs.common import make_pipeline
from tests.factories import make_record
from tests.http_fixture import placeholder_gif, sample_jpegs
from transforms.records import FetchedImage
from transforms import image_checks
from transforms.image_checks import STRIP_PIXELS, quick_check, to_rgb
from transforms.s4_decode import DecodeError, DecodeImages, decode_image


def encode(image: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def photo(name: str = "coffee", side: int = 400) -> Image.Image:
    image = Image.fromarray(np.asarray(getattr(data, name)()))
    image.thumbnail((side, side))
    return image


def reason_of(payload: bytes, **kwargs) -> str:
    with pytest.raises(DecodeError) as caught:
        decode_image(payload, **kwargs)
    return caught.value.reason


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "camera", "rocket", "moon", "page"])
def test_real_photos_decode_and_are_not_near_blank(name):
    image = photo(name, 500)
    payload = encode(image.convert("RGB") if image.mode not in ("L", "RGB") else image, quality=90)
    array, info = decode_image(payload)
    assert array.dtype == np.uint8 and array.shape == (image.height, image.width, 3)
    assert info.original_size == image.size and info.sha256 == hashlib.sha256(payload).hexdigest()
    assert info.format == "JPEG" and info.grey_std > 5


def test_exif_orientation_6_is_applied():
    stored = Image.new("RGB", (300, 200), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 60, 40))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    array, info = decode_image(encode(stored, exif=exif, quality=95))
    assert array.shape == (300, 200, 3)  # upright: portrait
    assert info.original_size == (300, 200) and info.orientation == 6
    top_right = array[:40, -30:].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[2] < 60  # the stored top-left is now the top-right


def test_cmyk_jpeg_becomes_rgb_with_the_same_colours():
    rgb = photo("coffee")
    array, info = decode_image(encode(rgb.convert("CMYK"), quality=95))
    assert info.mode == "CMYK" and array.shape == (rgb.height, rgb.width, 3)
    assert np.abs(array.astype(int) - np.asarray(rgb.convert("CMYK").convert("RGB"), int)).mean() < 6


def test_greyscale_jpeg_becomes_three_equal_channels():
    array, info = decode_image(encode(photo("camera")))
    assert info.mode == "L" and array.shape[2] == 3
    assert np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2])


def test_palette_png_and_gif():
    image = photo("chelsea").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    array, info = decode_image(encode(image, "PNG"))
    assert info.mode == "P" and np.array_equal(array, np.asarray(image.convert("RGB")))
    gif, gif_info = decode_image(encode(photo("astronaut").convert("P"), "GIF"))
    assert gif_info.format == "GIF" and gif.shape[2] == 3


def test_rgba_png_is_composited_on_white():
    rgba = photo("astronaut").convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, np.uint8)
    alpha[:, : rgba.width // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    array, info = decode_image(encode(rgba, "PNG"))
    assert info.mode == "RGBA" and array.shape[2] == 3
    assert (array[:, : rgba.width // 2] == 255).all()
    assert np.array_equal(array[:, rgba.width // 2:], np.asarray(rgba.convert("RGB"))[:, rgba.width // 2:])


def test_la_png_is_composited_on_white():
    la = photo("camera").convert("LA")
    alpha = np.full((la.height, la.width), 255, np.uint8)
    alpha[:50] = 0
    la.putalpha(Image.fromarray(alpha))
    array, _ = decode_image(encode(la, "PNG"))
    assert (array[:50] == 255).all() and array[50:].std() > 10


def test_16bit_png_is_scaled_not_clipped():
    grey8 = np.asarray(photo("camera"), np.uint16)
    image16 = Image.fromarray(grey8 * 257)  # full 16-bit range
    array, info = decode_image(encode(image16, "PNG"))
    assert info.mode.startswith("I")
    assert np.array_equal(array[..., 0], grey8.astype(np.uint8))


def test_truncated_jpeg():
    payload = sample_jpegs()["astronaut"]
    assert reason_of(payload[: len(payload) // 2]) == "truncated"


def test_zero_bytes():
    assert reason_of(b"") == "empty"


def test_html_body():
    assert reason_of(b"\n<!DOCTYPE html><html><body>404</body></html>") == "html"


def test_not_an_image():
    assert reason_of(b"%PDF-1.4 this is not a photo" * 10) == "not_an_image"


def test_corrupt_png():
    payload = bytearray(encode(photo("coffee"), "PNG"))
    payload[200:400] = bytes(200)
    assert reason_of(bytes(payload)) == "corrupt"


def test_decompression_bomb_checked_before_decoding():
    payload = sample_jpegs()["astronaut"]  # 500 x 500
    assert reason_of(payload, max_pixels=500 * 499) == "decompression_bomb"
    decode_image(payload, max_pixels=500 * 500)


def test_too_small():
    assert reason_of(encode(photo("coffee").resize((40, 20))), min_side=32) == "too_small"


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGB", (500, 375), (128, 128, 128)),  # flat grey garbage
    lambda: Image.new("RGB", (500, 375), (0, 0, 0)),  # black
    lambda: Image.fromarray((np.asarray(photo("astronaut", 500)) // 64).astype(np.uint8)),  # nearly black
])
def test_near_blank_jpegs(make):
    assert reason_of(encode(make(), quality=90)) == "near_blank"


def test_two_colour_placeholder_is_near_blank():
    assert reason_of(placeholder_gif()) == "near_blank"


def test_decode_images_transform():
    good, bad = make_record(1), make_record(2)
    fetched = [FetchedImage(good, sample_jpegs()["chelsea"], "http://x/1.jpg", "mirror"),
               FetchedImage(bad, b"", "http://x/2.jpg", "mirror")]
    with make_pipeline(PipelineOptions([])) as pipeline:
        outputs = pipeline | beam.Create(fetched) | DecodeImages(min_side=32)
        assert_that(outputs.main | beam.Map(lambda d: (d.record.photo_id, d.image.shape, d.url)),
                    equal_to([(1, (333, 500, 3), "http://x/1.jpg")]), label="Main")
        assert_that(outputs.rejects | beam.Map(lambda r: (r.photo_id, r.stage, r.reason)),
                    equal_to([(2, "decode", "empty")]), label="Rejects")


# --- issue 10: decode amplification (finding 5) and corrupt entropy data (finding 14) ----------


def flat_rgba_png(width: int, height: int) -> bytes:
    """A flat grey RGBA PNG written row by row (a 6300x6300 one is ~170 KB, ~160 MB decoded)."""
    row = b"\x00" + b"\x80\x80\x80\xff" * width
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def traced_peak(function, *args) -> tuple[object, int]:
    """(result or raised exception, peak bytes traced by tracemalloc while it ran)."""
    tracemalloc.start()
    try:
        try:
            result = function(*args)
        except Exception as error:  # the test looks at it
            result = error
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_flat_6300px_rgba_png_is_refused_from_its_header_in_decode_and_quick_check():
    payload = flat_rgba_png(6300, 6300)
    assert len(payload) < 400_000
    for check in (decode_image, quick_check):
        result, peak = traced_peak(check, payload)
        assert isinstance(result, DecodeError) and result.reason == "decompression_bomb", check
        assert peak < 5_000_000, (check, peak)  # base: 2.2 GiB and 7 s of CPU
        assert "6300x6300" in result.detail


def test_large_rgba_is_composited_without_a_float_copy_of_the_whole_image():
    payload = flat_rgba_png(3000, 3000)  # 9 MP, under the cap: decoded, then near-blank
    result, peak = traced_peak(decode_image, payload)
    assert isinstance(result, DecodeError) and result.reason == "near_blank"
    # The RGB uint8 result (27 MB) + one strip; a float32 RGBA copy alone is 144 MB.
    assert peak < 50_000_000, peak


def test_strip_compositing_equals_whole_image_compositing():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (STRIP_PIXELS // 300 * 2 + 37, 300, 4), dtype=np.uint8)
    got = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    whole = rgba.astype(np.float32)
    alpha = whole[:, :, 3:4] / 255.0
    expected = np.clip(np.rint(whole[:, :, :3] * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)
    assert np.array_equal(got, expected)


def test_oversized_jpeg_decodes_at_a_reduced_dct_scale():
    payload = encode(photo("astronaut", 512).resize((4600, 1000)), quality=80)
    array, info = decode_image(payload)
    assert info.original_size == (4600, 1000)
    assert array.shape == (500, 2300, 3)  # 1/2 scale: <= 4 MP decoded


def test_concurrent_large_decodes_are_bounded_per_process(monkeypatch):
    real_load = image_checks._load
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def counting_load(image):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(0.05)
            return real_load(image)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(image_checks, "_load", counting_load)
    big = encode(photo("astronaut", 512).resize((2100, 2000)), "PNG")  # 4.2 MP > LARGE_DECODE_PIXELS
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        shapes = list(pool.map(lambda payload: decode_image(payload)[0].shape, [big] * 6))
    assert shapes == [(2000, 2100, 3)] * 6
    assert state["max"] == image_checks.LARGE_DECODE_SLOTS


def _zeroed_tail(payload: bytes) -> bytes:
    """The second half zeroed, the end-of-image marker kept (Pillow alone decodes it)."""
    half = len(payload) // 2
    return payload[:half] + bytes(len(payload) - half - 2) + b"\xff\xd9"


def _random_middle(payload: bytes, seed: int, count: int = 100) -> bytes:
    rng = random.Random(seed)
    damaged = bytearray(payload)
    start = len(payload) // 2
    damaged[start:start + count] = bytes(rng.randrange(256) for _ in range(count))
    return bytes(damaged)


@pytest.mark.parametrize("damage", ["zeroed_tail", "random_3", "random_4", "random_5", "random_9"])
def test_corrupt_jpeg_entropy_data_is_a_decode_reject(damage):
    payload = sample_jpegs()["astronaut"]
    damaged = (_zeroed_tail(payload) if damage == "zeroed_tail"
               else _random_middle(payload, int(damage.split("_")[1])))
    assert reason_of(damaged) == "corrupt"
    assert quick_check(damaged).reason == "corrupt"
    assert "Corrupt JPEG data" in quick_check(damaged).detail
