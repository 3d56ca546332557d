"""Image codecs: (H, W, 3) uint8 RGB arrays <-> PNG bytes, the one stored image format.

Ground floor: imports nothing from synth, so every stage (generate writes shards, dataset
normalises and reads splits) shares one encoder and one decoder instead of importing each other.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

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


@dataclass
class GeneratedImages:
    """What a generator returns for a batch: one image per row, in the batch's order."""

    small: np.ndarray  # (N, S, S, 3) uint8 at generate.image_size
    full: Optional[np.ndarray] = None  # (N, H, W, 3) uint8 at the model's resolution, if kept


MASKS = ("border", "box", "center")


def inpaint_mask(kind: str, height: int, width: int, seed: int) -> np.ndarray:
    """(H, W) bool: True where an inpainting edit repaints, False where the parent is kept.

    - ``border``: a ring a quarter of each side wide; the parent's centre (its subject, usually)
      is kept and put in new surroundings.
    - ``box``: one seeded random box covering 20-45% of each side, anywhere in the image.
    - ``center``: the central half of each side; the surroundings are kept.

    A pure function of its arguments, so a retried shard repaints exactly the same pixels.
    """
    mask = np.zeros((height, width), dtype=bool)
    if kind == "border":
        dy, dx = max(1, height // 4), max(1, width // 4)
        mask[:, :] = True
        mask[dy : height - dy, dx : width - dx] = False
    elif kind == "center":
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    elif kind == "box":
        rng = np.random.default_rng(seed)
        bh = max(1, int(round(height * rng.uniform(0.2, 0.45))))
        bw = max(1, int(round(width * rng.uniform(0.2, 0.45))))
        top, left = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
        mask[top : top + bh, left : left + bw] = True
    else:
        raise ValueError(f"unknown inpainting mask {kind!r}; choose one of {', '.join(MASKS)}")
    return mask
