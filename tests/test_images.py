"""The ground-floor image codecs: lossless round trips, and nothing imported from the stages."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from conftest import REPO, synth_imports
from synth.images import decode_png, encode_png


def test_png_round_trip_is_lossless():
    img = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    png = encode_png(img)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    back = decode_png(png)
    assert back.dtype == np.uint8 and back.shape == (5, 7, 3)
    np.testing.assert_array_equal(back, img)


def test_decode_gives_rgb_for_any_mode():
    buf = io.BytesIO()
    Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(buf, format="PNG")
    assert decode_png(buf.getvalue()).shape == (3, 4, 3)
    assert (decode_png(buf.getvalue()) == [10, 20, 30]).all()


def test_images_is_a_ground_floor_module():
    assert synth_imports(REPO / "synth" / "images.py") == set()
