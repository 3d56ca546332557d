"""A malformed-request campaign against the web app: no answer is a 5xx, every API error is clear JSON.

About three thousand requests through Flask's test client, every one drawn from one seeded
generator (:data:`SEED`; a failure names its family and case, so it reproduces): PNG and JPEG
files made from the run's own test images and then mutated (bytes flipped, cut short, chunks and
segments removed, duplicated or mangled, wrong magic, huge dimensions behind a correct CRC, every
colour mode, animations), files of other types under image names, missing and duplicated fields,
wrong content types, non-UTF-8 bodies, hostile names in every route parameter and name field,
random JSON bodies and query strings, missing and forged CSRF tokens. The counts per status are
printed in the terminal summary ("fault campaign figures").

Then the edges that must be exact: the file limit and the whole-request limit (N bytes answer
200, N + 1 answer 413), and a generator queue that answers 503 with Retry-After, never a hang.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from collections import Counter
from typing import Optional
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from conftest import WEB_RUN, app_for, client_with_token, copy_of_run, png_bytes

SEED = 20261129
MODEL = f"{WEB_RUN}/train-synthetic/seed-0"
CLASSES = ("bird", "cat", "deer", "dog", "frog", "horse")  # the smoke preset's
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the campaign classifies hundreds of files (conftest.torch_threads)

# Names no route or name field may accept (check_name refuses each), as the server decodes them.
HOSTILE = [
    "", ".", "..", "...", "a..b", "../..", "../../etc/passwd", "..\\..\\windows\\win.ini", "a/b", "/abs", "a\\b", "\\",
    "a\x00b", "\x00", f"{WEB_RUN}\x00", f"{WEB_RUN}\x00.png", "ｗｅｂｒｕｎ", "wеbrun", f"{WEB_RUN}\u200b", "\u2024\u2024",
    "\u2025", "%2e%2e", "%2e%2e%2f", "%252e%252e", f"{WEB_RUN}/../{WEB_RUN}", f" {WEB_RUN}", f"{WEB_RUN} ", f"{WEB_RUN}\n",
    ".hidden", "-rf", "_x", "~", "$(id)", f"{WEB_RUN};ls", "\U0001f600", f"\ufeff{WEB_RUN}", "a" * 129, "a" * 5000,
]  # fmt: skip
# Names as they travel in a URL: each hostile name percent-encoded, and raw encodings of traversal.
SEGMENTS = [quote(name, safe="") for name in HOSTILE] + [
    "..", ".", "%2e%2e", "%2E%2E", "%2e%2e%2f%2e%2e", "..%2F..%2Fetc%2Fpasswd", "a%2Fb", "a%5Cb", "%5C", "a%00b", "%00",
    "..;", "%c0%ae%c0%ae", "%ff", "%", "%zz", "a%20b", "%E2%80%A4%E2%80%A4",
]  # fmt: skip
UNKNOWN = ["CON", "WEBRUN", f"{WEB_RUN}.", "nope", "a" * 128]  # valid names that name nothing: 404


# --------------------------------------------------------------------------------------------
# The campaign's bookkeeping
# --------------------------------------------------------------------------------------------


def broken_promise(response, path: str, method: str) -> Optional[str]:
    """What the app's error contract says this answer must not be, or None."""
    body = response.get_data()
    if response.status_code >= 500:
        return f"{response.status_code}: {body[:300]!r}"
    if b"Traceback" in body:
        return f"{response.status_code} with a traceback in the body"
    if 400 <= response.status_code < 500 and path.startswith("/api/") and method != "HEAD":
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            return f"{response.status_code} is not a JSON object: {body[:200]!r}"
        if not isinstance(error, str) or not error.strip():
            return f"{response.status_code} has no error message: {body[:200]!r}"
    return None


class Campaign:
    """One test client's requests: counts per family and status, and every broken promise with its case."""

    def __init__(self, client):
        self.client = client
        self.counts: dict[str, Counter] = {}
        self.seconds: Counter = Counter()
        self.problems: list[str] = []

    def send(self, family: str, case: str, method: str, path: str, expect=None, **kwargs):
        tick = time.perf_counter()
        response = self.client.open(path, method=method, **kwargs)
        self.seconds[family] += time.perf_counter() - tick
        self.counts.setdefault(family, Counter())[response.status_code] += 1
        problem = broken_promise(response, path, method)
        if problem is None and expect is not None and response.status_code not in expect:
            problem = f"expected {sorted(expect)}, got {response.status_code}: {response.get_data()[:200]!r}"
        if problem:
            self.problems.append(f"{family} #{case}: {method} {path[:100]!r} -> {problem}")
        return response

    def classify(self, family: str, case: str, data: bytes, name: str = "x.png", model: str = MODEL, expect=None):
        # A form field travels as bytes: a lone surrogate arrives as the bytes that encode it.
        form = {"model": model.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "image": (io.BytesIO(data), name)}
        return self.send(family, case, "POST", "/api/classify", expect, data=form, content_type="multipart/form-data")

    def post_json(self, family: str, case: str, path: str, body, expect=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.send(family, case, "POST", path, expect, data=data, content_type="application/json")

    def total(self) -> Counter:
        return sum(self.counts.values(), Counter())


# --------------------------------------------------------------------------------------------
# Files: real images in every mode, then damaged
# --------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def readable_files(photos: list[np.ndarray]) -> list[tuple[str, bytes]]:
    """(label, file) of images the app must read: the run's test photos in each format, mode and size it accepts."""
    files = []
    for i, photo in enumerate(photos[:4]):
        img = Image.fromarray(photo)
        files += [(f"png-{i}", encode(img, "PNG")), (f"jpeg-{i}", encode(img, "JPEG", quality=90)), (f"webp-{i}", encode(img, "WEBP", lossless=True))]
    img = Image.fromarray(photos[0])
    grey = np.asarray(img.convert("L"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated; the dataset code turns it upright
    files += [
        ("png-rgba", encode(img.convert("RGBA"), "PNG")), ("png-la", encode(img.convert("LA"), "PNG")),
        ("png-grey", encode(img.convert("L"), "PNG")), ("png-palette", encode(img.convert("P"), "PNG")),
        ("png-palette-alpha", encode(img.convert("P"), "PNG", transparency=0)), ("png-1bit", encode(img.convert("1"), "PNG")),
        ("png-16bit-grey", encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")),
        ("png-96x64", encode(img.resize((96, 64)), "PNG")), ("png-1x1", encode(img.resize((1, 1)), "PNG")),
        ("jpeg-grey", encode(img.convert("L"), "JPEG")), ("jpeg-cmyk", encode(img.convert("CMYK"), "JPEG")),
        ("jpeg-progressive", encode(img.resize((96, 96)), "JPEG", progressive=True)),
        ("jpeg-q5-444", encode(img, "JPEG", quality=5, subsampling=0)), ("jpeg-exif-rotated", encode(img.resize((48, 32)), "JPEG", exif=exif)),
        ("jpeg-1x1", encode(img.resize((1, 1)), "JPEG")), ("webp-lossy-rgba", encode(img.convert("RGBA"), "WEBP", quality=50)),
        ("webp-1x1", encode(img.resize((1, 1)), "WEBP")),
        ("webp-animated", encode(img, "WEBP", save_all=True, append_images=[Image.fromarray(p) for p in photos[1:4]], duration=100)),
    ]  # fmt: skip
    return files


def unreadable_files(photos: list[np.ndarray]) -> list[tuple[str, bytes, str]]:
    """(label, file, name) of files the app must refuse with a 400: other formats under image names."""
    img = Image.fromarray(photos[0])
    frames = [Image.fromarray(p) for p in photos[1:4]]
    return [
        ("empty", b"", "x.png"), ("gif", encode(img, "GIF"), "x.png"), ("gif-animated", encode(img, "GIF", save_all=True, append_images=frames), "x.gif"),
        ("bmp", encode(img, "BMP"), "x.png"), ("tiff", encode(img, "TIFF"), "x.jpg"), ("ico", encode(img, "ICO"), "x.png"),
        ("ppm", encode(img, "PPM"), "x.png"), ("text", b"hello, this is not an image\n", "x.png"),
        ("pdf", b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n", "x.png"),
        ("zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(200), "x.jpg"), ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "x.png"),
        ("html", b"<!doctype html><script>alert(1)</script>", "x.png"), ("png-magic-only", PNG_MAGIC, "x.png"),
        ("jpeg-soi-only", b"\xff\xd8\xff", "x.jpg"), ("riff-webp-header-only", b"RIFF\x10\x00\x00\x00WEBPVP8 ", "x.webp"),
    ]  # fmt: skip


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of each chunk of a well-formed PNG."""
    chunks, pos = [], len(PNG_MAGIC)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_join(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, each with its correct length and CRC (so only the content is wrong)."""
    return PNG_MAGIC + b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks)


def with_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` claiming another size in its IHDR, behind a correct CRC."""
    chunks = png_chunks(png)
    kind, body = chunks[0]
    chunks[0] = (kind, struct.pack(">II", width, height) + body[8:])
    return png_join(chunks)


def mangle_png(data: bytes, rng: np.random.Generator) -> bytes:
    chunks = png_chunks(data)
    i, j = (int(k) for k in rng.integers(0, len(chunks), 2))
    op = int(rng.integers(0, 8))
    if op == 0:
        del chunks[i]  # IHDR, IDAT or IEND missing
    elif op == 1:
        chunks.insert(i, chunks[i])  # a duplicated chunk (two IHDRs, two IENDs, ...)
    elif op == 2:
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif op == 3:  # damaged content the CRC no longer catches
        kind, body = chunks[i]
        chunks[i] = (kind, bytes(b ^ int(rng.integers(0, 256)) if rng.random() < 0.2 else b for b in body))
    elif op == 4:  # an unknown critical chunk, or an ancillary one full of garbage
        chunks.insert(max(1, i), (b"zZZZ" if rng.random() < 0.5 else b"tEXt", rng.bytes(int(rng.integers(0, 64)))))
    elif op == 5:  # the image data in many small IDATs, or none
        kind, body = next(c for c in chunks if c[0] == b"IDAT")
        pieces = [(b"IDAT", body[k : k + 7]) for k in range(0, len(body), 7)] if rng.random() < 0.5 else [(b"IDAT", b"")]
        chunks = [c for c in chunks if c[0] != b"IDAT"]
        chunks[1:1] = pieces
    elif op == 6:  # a bit depth, colour type or interlace method the data does not have
        kind, body = chunks[0]
        field = 8 + int(rng.integers(0, 5))
        chunks[0] = (kind, body[:field] + bytes([int(rng.integers(0, 256))]) + body[field + 1 :])
    else:  # a chunk length that lies (the CRC is then read from the wrong place)
        out = bytearray(png_join(chunks))
        pos = len(PNG_MAGIC) + sum(12 + len(b) for _, b in chunks[:i])
        out[pos : pos + 4] = struct.pack(">I", int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1, len(out)])))
        return bytes(out)
    return png_join(chunks)


def jpeg_segments(data: bytes) -> tuple[list[bytes], bytes]:
    """Each marker segment of a JPEG up to and including its start-of-scan header, and the rest."""
    segments, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        segments.append(data[pos : pos + 2 + length])
        pos += 2 + length
        if data[pos - 2 - length + 1] == 0xDA:  # SOS: entropy-coded data follows
            break
    return segments, data[pos:]


def mangle_jpeg(data: bytes, rng: np.random.Generator) -> bytes:
    segments, rest = jpeg_segments(data)
    i = int(rng.integers(0, len(segments)))
    op = int(rng.integers(0, 7))
    if op == 0:
        del segments[i]  # no quantisation table, no Huffman table, no frame header, ...
    elif op == 1:
        segments.insert(i, segments[i])
    elif op == 2:  # a segment length that lies
        seg = bytearray(segments[i])
        seg[2:4] = struct.pack(">H", int(rng.integers(0, 65536)))
        segments[i] = bytes(seg)
    elif op == 3:  # a frame header claiming another size: huge, zero or one pixel
        for k, seg in enumerate(segments):
            if seg[1] in (0xC0, 0xC1, 0xC2):
                h, w = (int(rng.choice([0, 1, 8193, 65535])) for _ in range(2))
                segments[k] = seg[:5] + struct.pack(">HH", h, w) + seg[9:]
    elif op == 4:  # an EXIF block of garbage, where the dataset code reads the orientation
        payload = b"Exif\x00\x00" + rng.choice([b"II*\x00", b"MM\x00*"]) + rng.bytes(int(rng.integers(0, 120)))
        segments.insert(0, b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload)
    elif op == 5:  # a real EXIF block with a random orientation
        exif = Image.Exif()
        exif[0x0112] = int(rng.integers(0, 65536))
        payload = b"Exif\x00\x00" + exif.tobytes()
        segments.insert(0, b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload)
    else:  # the scan cut short, then a proper end marker
        rest = rest[: int(rng.integers(0, max(1, len(rest))))] + b"\xff\xd9"
    return b"\xff\xd8" + b"".join(segments) + rest


def damage(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """(what was done, the damaged file): a generic mutation, or one that knows the PNG/JPEG structure."""
    kind = "png" if data.startswith(PNG_MAGIC) else "jpeg" if data.startswith(b"\xff\xd8") else "other"
    op = int(rng.integers(0, 8))
    if op <= 1:
        out = bytearray(data)
        for _ in range(int(rng.integers(1, 9))):
            out[int(rng.integers(0, len(out)))] ^= int(rng.integers(1, 256))
        return "byte flips", bytes(out)
    if op == 2:
        return "truncated", data[: int(rng.integers(0, len(data)))]
    if op == 3:
        magic = [b"GIF89a", b"BM", b"II*\x00", b"%PDF", b"PK\x03\x04", b"\x00\x00\x00\x00", rng.bytes(8)][int(rng.integers(0, 7))]
        return "wrong magic", magic + data[len(magic) :]
    if op == 4:
        return "garbage", rng.bytes(int(rng.integers(1, 5000)))
    if op == 5:
        return "garbage tail", data + rng.bytes(int(rng.integers(1, 3000)))
    if kind == "png":
        return "png chunks", mangle_png(data, rng)
    if kind == "jpeg":
        return "jpeg segments", mangle_jpeg(data, rng)
    return "halved", data[: len(data) // 2]


# --------------------------------------------------------------------------------------------
# Random JSON and text
# --------------------------------------------------------------------------------------------


def random_text(rng: np.random.Generator) -> str:
    pick = int(rng.integers(0, 10))
    if pick == 0:
        return ""
    if pick == 1:
        return "".join(chr(int(c)) for c in rng.integers(0, 32, int(rng.integers(1, 8))))  # control characters
    if pick == 2:
        return "\ud800" + "x" + "\udfff"  # lone surrogates: valid JSON escapes, not valid text
    if pick == 3:
        return "x" * int(rng.choice([101, 2001, 20_000]))
    if pick == 4:
        return HOSTILE[int(rng.integers(0, len(HOSTILE)))]
    if pick == 5:
        return "".join(chr(int(c)) for c in rng.integers(0x80, 0x3000, int(rng.integers(1, 20))))
    if pick == 6:
        return CLASSES[int(rng.integers(0, len(CLASSES)))]
    if pick == 7:
        return str(int(rng.integers(-(2**62), 2**62)))
    return "".join(chr(int(c)) for c in rng.integers(32, 127, int(rng.integers(1, 40))))


def random_json(rng: np.random.Generator, depth: int = 0):
    pick = int(rng.integers(0, 9 if depth < 3 else 6))
    if pick == 0:
        return None
    if pick == 1:
        return bool(rng.integers(0, 2))
    if pick == 2:
        return [0, -1, 1, 7, 2**31, 2**63 - 1, 2**63, -(2**63), 10**30][int(rng.integers(0, 9))]
    if pick == 3:
        return [0.5, -1.5, 1e308, -0.0, float("nan"), float("inf"), 3.0][int(rng.integers(0, 7))]
    if pick in (4, 5):
        return random_text(rng)
    if pick == 6:
        return [random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))]
    return {random_text(rng): random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))}


def maybe(rng: np.random.Generator, valid, p: float = 0.5):
    """``valid`` with probability ``p``, else random JSON."""
    return valid if rng.random() < p else random_json(rng)


def generate_body(rng: np.random.Generator) -> dict:
    keys = [k for k in ("prompt", "class", "technique", "seed", "save_run", "negative", "extra") if rng.random() < 0.45]
    body = {}
    for key in keys:
        if key == "prompt":
            # The test kit's generator draws only prompts that name a class (others fail as a model's
            # failure would): a prompt the app accepts names one.
            text = maybe(rng, "a photo of a")
            body[key] = f"{text} {CLASSES[int(rng.integers(0, len(CLASSES)))]}" if isinstance(text, str) else text
        elif key == "class":
            body[key] = maybe(rng, CLASSES[int(rng.integers(0, len(CLASSES)))])
        elif key == "technique":
            body[key] = maybe(rng, ["environment", "domain", "vanilla", "hard", "hostile", "llm"][int(rng.integers(0, 6))])
        elif key == "seed":
            body[key] = maybe(rng, int(rng.integers(0, 1000)))
        elif key == "save_run":
            body[key] = maybe(rng, "fuzz-saves", 0.3)
        else:
            body[key] = random_json(rng)
    return body


def decision_body(rng: np.random.Generator, ids: list[str]) -> dict:
    def entry():
        e = {"id": maybe(rng, ids[int(rng.integers(0, len(ids)))], 0.7), "decision": maybe(rng, ["accept", "reject", "relabel"][int(rng.integers(0, 3))], 0.7)}
        if rng.random() < 0.4:
            e["class"] = maybe(rng, CLASSES[int(rng.integers(0, len(CLASSES)))])
        if rng.random() < 0.1:
            e[random_text(rng)] = random_json(rng)
        return e

    body = {"reviewer": maybe(rng, "fuzz", 0.7), "decisions": maybe(rng, [entry() for _ in range(int(rng.integers(0, 6)))], 0.8)}
    return {k: v for k, v in body.items() if rng.random() < 0.9}


def undo_body(rng: np.random.Generator, submissions: list[str]) -> dict:
    names = submissions + ["20261129T101500123456Z-1a2b3c4d.jsonl", "../x.jsonl", f"..%2F{WEB_RUN}.jsonl", "x.jsonl\x00"]
    return {"reviewer": maybe(rng, "fuzz", 0.7), "submission": maybe(rng, names[int(rng.integers(0, len(names)))], 0.8)}


def multipart(parts: list[tuple[bytes, Optional[bytes], bytes]], boundary: str = "fuzzboundary") -> bytes:
    """A multipart/form-data body of (field name, file name or None, content), byte for byte."""
    out = b""
    for name, filename, content in parts:
        disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename is not None else b"")
        out += f"--{boundary}\r\n".encode() + b"Content-Disposition: " + disposition + b"\r\n"
        out += (b"Content-Type: application/octet-stream\r\n" if filename is not None else b"") + b"\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


# --------------------------------------------------------------------------------------------
# The campaign
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg(web_run, tmp_path_factory):
    """The run's own config on a copy of its storage: the campaign's decisions and saves stay here."""
    return copy_of_run(web_run, tmp_path_factory.mktemp("fuzz") / "runs")


@pytest.fixture(scope="module")
def photos(cfg) -> list[np.ndarray]:
    """The real test split's images, (32, 32, 3) uint8: what every file in the campaign starts from."""
    from synth.dataset import decode_images, load_split_table
    from synth.storage import Storage

    return list(decode_images(load_split_table(Storage(cfg.storage.root), WEB_RUN, "real", "test"))[:8])


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow, on the campaign's garbage EXIF blocks
def test_malformed_requests_get_a_clear_4xx_never_a_5xx(cfg, photos, fault_figures):
    from synth.web import create_app

    rng = np.random.default_rng(SEED)
    app = create_app(cfg, secret_key="test")  # its generator: the fast class-aware test generator
    c = Campaign(client_with_token(app))
    tick = time.perf_counter()
    ok, refused = {200}, {400}
    sample = c.send("setup", "0", "GET", f"/api/runs/{WEB_RUN}/samples?domain=synthetic&split=train&limit=3").get_json()["items"][0]["id"]
    ids = [i["id"] for i in c.send("setup", "1", "GET", f"/api/runs/{WEB_RUN}/review/queue?limit=500").get_json()["items"]]

    # 1. Uploads: every readable image answers 200 under any file name; other types 400;
    #    damaged files 200 (still decodable) or 400; a bad model key 400 or 404.
    readable = readable_files(photos)
    names = ["x.png", "x.jpg", "x.webp", "x", "../../etc/x.png", "x.png\x00.exe", "ｘ.png", "x" * 300 + ".png"]
    for n, (label, data) in enumerate(readable):
        name = names[n % len(names)]
        c.classify("uploads", f"{label} as {name[:12]!r}", data, name, expect=ok)
    for label, data, name in unreadable_files(photos):
        c.classify("uploads", label, data, name, expect=refused)
    base = png_bytes(photos[0])
    for width, height in [(0, 0), (0, 32), (32, 0), (2**31 - 1, 2**31 - 1), (2**32 - 1, 1), (65535, 65535), (8193, 1), (1, 8193),
                          (8192, 8192), (7000, 7000), (4096, 4096)]:  # fmt: skip
        c.classify("uploads", f"IHDR {width}x{height}", with_size(base, width, height), expect=refused)
    for width, height in [(1, 1), (32, 31), (31, 32)]:  # more or other data than the size needs: read or refused
        c.classify("uploads", f"IHDR {width}x{height}", with_size(base, width, height), expect={200, 400})
    for n in range(800):
        label, data = readable[int(rng.integers(0, len(readable)))]
        what, bad = damage(data, rng)
        if rng.random() < 0.85:
            c.classify("uploads", f"{n} {label} {what}", bad, expect={200, 400})
        else:
            model = [f"{WEB_RUN}/train-synthetic/seed-1", "nope", "", f"{WEB_RUN}/train-synthetic/seed-\u0660", random_text(rng)][int(rng.integers(0, 5))]
            c.classify("uploads", f"{n} {label} {what} model {model[:20]!r}", bad, model=model or "x", expect={400, 404})

    # 2. Fields and content types.
    png, jpeg = png_bytes(photos[1]), png_bytes(photos[1], "JPEG")
    classify, generate = "/api/classify", "/api/generate"
    cases = [
        ("no image", classify, {"data": {"model": MODEL}}, refused),
        ("no model", classify, {"data": {"image": (io.BytesIO(png), "x.png")}}, refused),
        ("empty model", classify, {"data": {"model": "", "image": (io.BytesIO(png), "x.png")}}, refused),
        ("nothing", classify, {"data": {}, "content_type": "multipart/form-data"}, refused),
        ("image as text", classify, {"data": {"model": MODEL, "image": "iVBORw0KGgo="}}, refused),
        ("two images", classify, {"data": {"model": MODEL, "image": [(io.BytesIO(png), "a.png"), (io.BytesIO(b"junk"), "b.png")]}}, ok),
        ("two models", classify, {"data": {"model": [MODEL, "nope"], "image": (io.BytesIO(jpeg), "a.jpg")}}, ok),
        ("json", classify, {"json": {"model": MODEL, "image": "iVBORw0KGgo="}}, refused),
        ("urlencoded", classify, {"data": {"model": MODEL, "image": "x"}, "content_type": "application/x-www-form-urlencoded"}, refused),
        ("text/plain", classify, {"data": png, "content_type": "text/plain"}, refused),
        ("raw png", classify, {"data": png, "content_type": "image/png"}, refused),
        ("no boundary", classify, {"data": multipart([(b"model", None, MODEL.encode())]), "content_type": "multipart/form-data"}, refused),
        ("wrong boundary", classify, {"data": multipart([(b"image", b"x.png", png)]), "content_type": "multipart/form-data; boundary=other"}, refused),
        ("garbage multipart", classify, {"data": b"--fuzzboundary\r\n" + rng.bytes(3000), "content_type": "multipart/form-data; boundary=fuzzboundary"}, refused),
        ("unterminated multipart", classify, {"data": multipart([(b"model", None, MODEL.encode()), (b"image", b"x.png", png)])[:-40],
                                              "content_type": "multipart/form-data; boundary=fuzzboundary"}, {200, 400}),
        ("non-UTF-8 names", classify, {"data": multipart([(b"model", None, MODEL.encode()), (b"image", b"\xff\xfe.png", png), (b"\xff", None, b"\xfe")]),
                                       "content_type": "multipart/form-data; boundary=fuzzboundary"}, refused),  # the parser drops the form
        ("non-UTF-8 model", classify, {"data": multipart([(b"model", None, b"\xff\xfe/\x80/seed-0"), (b"image", b"x.png", png)]),
                                       "content_type": "multipart/form-data; boundary=fuzzboundary"}, refused),
        ("form to generate", generate, {"data": {"class": "cat", "technique": "environment"}}, ok),
        ("multipart to generate", generate, {"data": {"class": "cat", "seed": "3"}, "content_type": "multipart/form-data"}, ok),
        ("text to generate", generate, {"data": '{"class": "cat"}', "content_type": "text/plain"}, refused),
        ("no body", generate, {}, refused),
        ("non-UTF-8 json", generate, {"data": b'{"prompt": "a \xff\xfe cat"}', "content_type": "application/json"}, refused),
        ("latin-1 json", generate, {"data": '{"prompt": "a cät"}'.encode("latin-1"), "content_type": "application/json; charset=latin-1"}, {200, 400}),
        ("utf-16 json", generate, {"data": '{"class": "cat"}'.encode("utf-16"), "content_type": "application/json"}, {200, 400}),
        ("duplicate keys", generate, {"data": b'{"class": "whale", "class": "cat"}', "content_type": "application/json"}, ok),
        ("truncated json", generate, {"data": b'{"class": "cat", "tech', "content_type": "application/json"}, refused),
        ("deep json", generate, {"data": b"[" * 100_000 + b"]" * 100_000, "content_type": "application/json"}, refused),
        ("deep object", generate, {"data": b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "content_type": "application/json"}, refused),
        ("huge integer", generate, {"data": b'{"class": "cat", "seed": ' + b"9" * 5000 + b"}", "content_type": "application/json"}, refused),
        ("json null", generate, {"data": b"null", "content_type": "application/json"}, refused),
        ("json list", generate, {"json": [{"class": "cat"}]}, refused),
    ]  # fmt: skip
    for n, (label, path, kwargs, expect) in enumerate(cases):
        c.send("fields", f"{n} {label}", "POST", path, expect, **kwargs)
    for path in (f"/api/runs/{WEB_RUN}/review/decisions", f"/api/runs/{WEB_RUN}/review/undo"):
        for label, kwargs in [("deep", {"data": b"[" * 100_000, "content_type": "application/json"}), ("non-UTF-8", {"data": b"\xff\xfe{", "content_type": "application/json"}),
                              ("form", {"data": {"reviewer": "fuzz", "decisions": "x"}}), ("text", {"data": "{}", "content_type": "text/plain"})]:  # fmt: skip
            c.send("fields", f"{path} {label}", "POST", path, refused, **kwargs)

    # 3. Names: every hostile name, raw and encoded, in every route parameter and name field.
    run_routes = ["/runs/{}", "/runs/{}/samples", "/runs/{}/review", "/runs/{}/report", "/api/runs/{}", "/api/runs/{}/samples",
                  "/api/runs/{}/generated", "/api/runs/{}/review/queue", "/api/runs/{}/review/log",
                  "/api/runs/{}/dataset/synthetic/train/" + sample + ".png", "/api/runs/{}/generated/x.png"]  # fmt: skip
    decision = {"reviewer": "fuzz", "decisions": [{"id": ids[0], "decision": "accept"}]}
    for seg in SEGMENTS:
        for route in run_routes:
            c.send("names", f"{route} {seg[:20]!r}", "GET", route.format(seg), {400, 404, 405})
        c.post_json("names", f"decide {seg[:20]!r}", f"/api/runs/{seg}/review/decisions", decision, {400, 404, 405})
        c.post_json("names", f"undo {seg[:20]!r}", f"/api/runs/{seg}/review/undo", {"reviewer": "fuzz", "submission": "20261129T101500123456Z-1a2b3c4d.jsonl"}, {400, 404, 405})
        for route in (f"/api/runs/{WEB_RUN}/dataset/{{}}/train/{sample}.png", f"/api/runs/{WEB_RUN}/dataset/synthetic/{{}}/{sample}.png",
                      f"/api/runs/{WEB_RUN}/dataset/synthetic/train/{{}}.png", f"/api/runs/{WEB_RUN}/generated/{{}}.png"):  # fmt: skip
            c.send("names", f"{route} {seg[:20]!r}", "GET", route.format(seg), {400, 404})
    for name in UNKNOWN:
        for route in run_routes:
            c.send("names", f"{route} {name[:20]!r}", "GET", route.format(name), {404} if "/generated" not in route else {200, 404})
    for name in HOSTILE:
        for model in (name, f"{name}/train-synthetic/seed-0", f"{WEB_RUN}/{name}/seed-0", f"{WEB_RUN}/train-synthetic/{name}", f"{WEB_RUN}/train-synthetic/seed-0{name}"):
            c.classify("names", f"model {model[:30]!r}", png, model=model, expect=ok if model == MODEL else refused)
        c.post_json("names", f"save_run {name[:20]!r}", generate, {"class": "cat", "save_run": name}, refused if name else ok)
        c.post_json("names", f"submission {name[:20]!r}", f"/api/runs/{WEB_RUN}/review/undo", {"reviewer": "fuzz", "submission": name}, refused)
        c.post_json("names", f"decision id {name[:20]!r}", f"/api/runs/{WEB_RUN}/review/decisions",
                    {"reviewer": "fuzz", "decisions": [{"id": name, "decision": "accept"}]}, refused)  # fmt: skip
    for model in (f"{WEB_RUN}/train-synthetic/seed-\u0660", f"{WEB_RUN}/train-synthetic/seed-\uff10", 
                  f"{WEB_RUN}/train-synthetic/seed-9999999999", f"{WEB_RUN}/train/seed-0", f"{WEB_RUN}/train-synthetic/config.yaml"):  # fmt: skip
        c.classify("names", f"model {model!r}", png, model=model, expect={400, 404})

    # 4. Random JSON bodies: structured (the fields each route reads, valid or not) and shapeless.
    submissions: list[str] = []
    for n in range(150):
        c.post_json("json", f"generate {n}", generate, generate_body(rng) if rng.random() < 0.7 else random_json(rng), {200, 400})
        r = c.post_json("json", f"decide {n}", f"/api/runs/{WEB_RUN}/review/decisions", decision_body(rng, ids) if rng.random() < 0.7 else random_json(rng), {200, 400})
        if r.status_code == 200:
            submissions.append(r.get_json()["submission"])
        c.post_json("json", f"undo {n}", f"/api/runs/{WEB_RUN}/review/undo", undo_body(rng, submissions) if rng.random() < 0.8 else random_json(rng), {200, 400, 404})
    assert submissions, "no random decision was valid: the campaign never reached the decision log"

    # 5. Random query strings on every GET route: known keys with wild values, unknown keys, bad escapes.
    get_routes = ["/", "/generate", "/classify", f"/runs/{WEB_RUN}", f"/runs/{WEB_RUN}/samples", f"/runs/{WEB_RUN}/review", f"/runs/{WEB_RUN}/report",
                  "/api/csrf", "/api/health", "/api/runs", f"/api/runs/{WEB_RUN}", f"/api/runs/{WEB_RUN}/samples", f"/api/runs/{WEB_RUN}/dataset/synthetic/train/{sample}.png",
                  "/api/models", "/api/generate/options", f"/api/runs/{WEB_RUN}/generated", f"/api/runs/{WEB_RUN}/review/queue", f"/api/runs/{WEB_RUN}/review/log"]  # fmt: skip
    keys = ["domain", "split", "class", "technique", "offset", "limit", "order", "undecided", "model", "x", ""]
    for n in range(250):
        parts = []
        for _ in range(int(rng.integers(1, 6))):
            value = random_text(rng) if rng.random() < 0.7 else str(random_json(rng))
            parts.append(f"{quote(keys[int(rng.integers(0, len(keys)))])}={quote(value[:3000], safe='', errors='surrogatepass')}")
        if rng.random() < 0.2:
            parts.append(["%ff%fe=%c0%af", "%", "a=%zz", "&&=&", "limit=1&limit=x", "offset=%2D1", "a=b=c", "limit=" + "9" * 5000][int(rng.integers(0, 8))])
        route = get_routes[int(rng.integers(0, len(get_routes)))]
        c.send("queries", f"{n}", "GET", f"{route}?{'&'.join(parts)}", {200, 400, 404})

    # 6. CSRF: every POST without a token, with a forged one (ASCII, non-ASCII, empty, huge), with
    #    another session's; the right one in the form field (where the pages send it) is taken.
    token = c.client.environ_base["HTTP_X_CSRF_TOKEN"]
    other = client_with_token(app).environ_base["HTTP_X_CSRF_TOKEN"]
    posts = [(classify, {"data": {"model": MODEL, "image": (io.BytesIO(png), "x.png")}}), (generate, {"json": {"class": "cat"}}),
             (f"/api/runs/{WEB_RUN}/review/decisions", {"json": decision}), (f"/api/runs/{WEB_RUN}/review/undo", {"json": {"reviewer": "fuzz", "submission": "x"}})]  # fmt: skip
    for path, kwargs in posts:
        fresh = Campaign(app.test_client())
        fresh.send("csrf", f"{path} no session", "POST", path, {403}, **{k: v for k, v in kwargs.items()})
        fresh.client.get("/api/csrf")
        for forged in (None, "forged", "", "tök€n".encode().decode("latin-1"), "x" * 10_000, other, token + "x"):
            kw = dict(kwargs)
            if "data" in kw and isinstance(kw["data"], dict):
                kw["data"] = {k: (io.BytesIO(png), "x.png") if k == "image" else v for k, v in kw["data"].items()}
            headers = {} if forged is None else {"X-CSRF-Token": forged}
            fresh.send("csrf", f"{path} token {str(forged)[:12]!r}", "POST", path, {403}, headers=headers, **kw)
        if path == classify:
            form = {"csrf_token": "é", "model": MODEL, "image": (io.BytesIO(png), "x.png")}
            fresh.send("csrf", "form token 'é'", "POST", path, {403}, data=form)
            mine = fresh.client.get("/api/csrf").get_json()["csrf_token"]
            form = {"csrf_token": mine, "model": MODEL, "image": (io.BytesIO(png), "x.png")}
            fresh.send("csrf", "form token", "POST", path, ok, data=form)
        if path == generate:
            mine = fresh.client.get("/api/csrf").get_json()["csrf_token"]
            fresh.send("csrf", "form token", "POST", path, ok, data={"csrf_token": mine, "class": "cat"})
        c.problems += fresh.problems
        for status, n in fresh.total().items():
            c.counts.setdefault("csrf", Counter())[status] += n

    # 7. Methods each route does not take.
    for path in (classify, generate, "/api/runs", f"/api/runs/{WEB_RUN}", f"/api/runs/{WEB_RUN}/review/decisions", f"/runs/{WEB_RUN}", "/api/csrf"):
        for method in ("PUT", "DELETE", "PATCH", "TRACE"):
            c.send("methods", f"{method} {path}", method, path, {403, 405})
        c.send("methods", f"HEAD {path}", "HEAD", path, {200, 405})
        c.send("methods", f"OPTIONS {path}", "OPTIONS", path, {200})

    # 8. After all that, the app still serves.
    r = c.classify("after", "classify", png, expect=ok)
    assert r.get_json()["predicted"] in CLASSES
    assert c.post_json("after", "generate", generate, {"class": "frog", "technique": "environment", "seed": 1}, ok).get_json()["class_name"] == "frog"
    assert len(c.send("after", "queue", "GET", f"/api/runs/{WEB_RUN}/review/queue?limit=5", ok).get_json()["items"]) == 5

    seconds = time.perf_counter() - tick
    total = c.total()
    figures = {family: " ".join(f"{s}:{n}" for s, n in sorted(counts.items())) for family, counts in c.counts.items()}
    fault_figures(seed=SEED, requests=sum(total.values()), seconds=round(seconds, 1), all=" ".join(f"{s}:{n}" for s, n in sorted(total.items())), **figures)
    print(f"\nweb fuzz: {sum(total.values())} requests in {seconds:.1f} s: {dict(sorted(total.items()))}; seconds by family: "
          + ", ".join(f"{f} {t:.1f}" for f, t in c.seconds.items()))
    assert not c.problems, f"{len(c.problems)} broken promises (seed {SEED}):\n" + "\n".join(c.problems[:40])
    assert sum(total.values()) >= 1000 and total[200] > 100 and total[400] > 500, total


# --------------------------------------------------------------------------------------------
# What the campaign and its probes found, pinned
# --------------------------------------------------------------------------------------------


def test_a_run_name_is_checked_before_the_decision_log_is_read(cfg):
    """Undo read ``<root>/<run>/curate/decisions`` before checking ``run``: ``..`` read a log
    outside the storage root (and a malformed one there answered 500)."""
    from pathlib import Path

    outside = Path(cfg.storage.root).parent / "curate" / "decisions"
    outside.mkdir(parents=True, exist_ok=True)
    submission = "20261129T101500123456Z-1a2b3c4d.jsonl"
    (outside / submission).write_text("not a decision\n")
    client = client_with_token(app_for(cfg, "generate.generator=synth.testkit:ClassAwareTestGenerator"))
    r = client.post("/api/runs/%2e%2e/review/undo", json={"reviewer": "fuzz", "submission": submission})
    assert r.status_code == 400 and "not a valid name" in r.get_json()["error"], r.get_data()
    r = client.get("/api/runs/%2e%2e/review/queue")  # read <root>/../curate/config.yaml for the class names
    assert r.status_code == 400 and "not a valid name" in r.get_json()["error"], r.get_data()


def test_a_prompt_that_is_not_text_is_refused_before_the_tokenizer(cfg, tiny_sd):
    """A lone surrogate (a valid JSON escape, no valid text) reached the CLIP tokenizer: 500."""
    client = client_with_token(app_for(cfg, f"generate.model={tiny_sd}"))
    for prompt in ("a \ud800 cat", "\udfff", "a cat\x9f"):
        r = client.post("/api/generate", data=json.dumps({"prompt": prompt}), content_type="application/json")
        assert r.status_code == 400 and "surrogates" in r.get_json()["error"], (prompt, r.get_data())


# --------------------------------------------------------------------------------------------
# The edges that must be exact
# --------------------------------------------------------------------------------------------


def test_the_file_limit_and_the_whole_request_limit_are_exact(cfg, photos):
    from synth.web.app import FORM_OVERHEAD

    n = 8192
    app = app_for(cfg, f"web.max_upload_bytes={n}", "generate.generator=synth.testkit:ClassAwareTestGenerator")
    limit = app.config["MAX_CONTENT_LENGTH"]
    assert limit == n + FORM_OVERHEAD
    client = client_with_token(app)

    def check(r, status: int, words: str = ""):
        assert r.status_code == status, r.get_data()[:300]
        if status != 200:
            assert words in r.get_json()["error"] and b"Traceback" not in r.data
        return r

    # 1. The file: a real image of exactly N bytes (bytes after its end marker, which decoders
    #    ignore) is read; N + 1 bytes are refused, however small the request around it.
    for fmt, name in (("PNG", "x.png"), ("JPEG", "x.jpg")):
        data = png_bytes(photos[2], fmt)
        exact = data + b"\0" * (n - len(data))
        assert len(exact) == n
        r = check(client.post("/api/classify", data={"model": MODEL, "image": (io.BytesIO(exact), name)}), 200)
        assert r.get_json()["input"]["format"] == fmt
        check(client.post("/api/classify", data={"model": MODEL, "image": (io.BytesIO(exact + b"\0"), name)}), 413, f"limit of {n}")

    # 2. The whole request: a multipart body of exactly MAX_CONTENT_LENGTH bytes (the image under
    #    N, the rest a padding field) is read; one byte more is refused before a byte is parsed.
    image = png_bytes(photos[2])

    def body(padding: int) -> bytes:
        return multipart([(b"model", None, MODEL.encode()), (b"image", b"x.png", image), (b"padding", None, b"p" * padding)])

    padding = limit - len(body(0))
    assert len(body(padding)) == limit and len(image) < n
    kind = "multipart/form-data; boundary=fuzzboundary"
    check(client.post("/api/classify", data=body(padding), content_type=kind), 200)
    check(client.post("/api/classify", data=body(padding + 1), content_type=kind), 413, f"limit of {n}")

    # 3. The same limit on a JSON body: whitespace-padded to exactly the limit it is read, one byte over it is 413.
    request = json.dumps({"class": "cat", "technique": "environment", "seed": 3}).encode()
    exact = request + b" " * (limit - len(request))
    check(client.post("/api/generate", data=exact, content_type="application/json"), 200)
    check(client.post("/api/generate", data=exact + b" ", content_type="application/json"), 413, "limit")


class SleepyGenerator:
    """A generator at a model's pace: every batch takes 0.2 s."""

    def generate(self, prompts, negatives, seeds, guidance_scales=None):
        from synth.images import GeneratedImages

        time.sleep(0.2)
        return GeneratedImages(small=np.zeros((len(prompts), 32, 32, 3), np.uint8))


def test_generation_beyond_the_queue_answers_503_with_retry_after_never_a_hang(cfg):
    app = app_for(cfg, "generate.generator=synth.testkit:ClassAwareTestGenerator", "web.queue_size=2", generator_factory=SleepyGenerator)
    threads_n = 20
    clients = [client_with_token(app) for _ in range(threads_n)]
    answers: list = [None] * threads_n
    start = threading.Barrier(threads_n)

    def ask(i: int) -> None:
        start.wait(10)
        r = clients[i].post("/api/generate", json={"class": "cat", "technique": "environment", "seed": i})
        answers[i] = (r.status_code, r.headers.get("Retry-After"), r.get_json())

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(threads_n)]
    tick = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, 20 - (time.perf_counter() - tick)))
    seconds = time.perf_counter() - tick
    assert not any(t.is_alive() for t in threads), f"{sum(t.is_alive() for t in threads)} requests hung"
    codes = Counter(a[0] for a in answers)
    assert set(codes) <= {200, 503} and codes[503] >= 1 and codes[200] >= 2, codes
    for status, retry_after, body in answers:
        if status == 503:
            assert int(retry_after) >= 1 and "busy" in body["error"], (retry_after, body)
    # One running and two queued at 0.2 s each, the rest refused at once: well under this bound.
    assert seconds < 10, f"{threads_n} requests took {seconds:.1f} s"
    print(f"\nqueue of 2, {threads_n} at once: {dict(codes)} in {seconds:.2f} s")
