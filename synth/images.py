"""Image codecs: (H, W, 3) uint8 RGB arrays <-> PNG bytes, the one stored image format.

Ground floor: imports nothing from synth, so every stage (generate writes shards, dataset
normalises and reads splits) shares one encoder and one decoder instead of importing each other.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# zlib's own default level, the usual balance of size and encoding time.
PNG_COMPRESS_LEVEL = 6


def encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of ``img``, an (H, W, 3) uint8 RGB array."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of an image's bytes (PNG, or any format PIL reads; alpha dropped)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
