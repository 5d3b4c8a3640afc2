"""Stage 4, decode: every image kind and every bad input on real encoded files (Pillow-written
JPEG/PNG/GIF, skimage photos), plus the DecodeImages Beam wrapper."""
from __future__ import annotations

import hashlib
import io

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
