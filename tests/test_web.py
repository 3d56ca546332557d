"""The web app through its JSON API and pages (Flask's test client), on a run the real stages made.

The browser walk is in test_web_browser.py and the malformed-request campaign in test_web_fuzz.py.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, WEB_RUN, app_for, client_with_token, png_bytes
from synth.storage import Layout, Storage


@pytest.fixture(scope="module")
def client(web_run):
    """An app on the run's own config: its class-aware generator and its prompt table."""
    from synth.web import create_app

    return client_with_token(create_app(web_run, secret_key="test"))


# --------------------------------------------------------------------------------------------
# Classify: the train stage's preprocessing and inference, to the last probability
# --------------------------------------------------------------------------------------------


def test_classify_gives_the_train_stage_prediction_for_every_test_image(web_run, client):
    import torch

    from synth.dataset import decode_images, load_split_table
    from synth.model import load_model
    from synth.recipe import logits

    storage = Storage(web_run.storage.root)
    models = client.get("/api/models").get_json()["models"]
    key = f"{WEB_RUN}/train-synthetic/seed-0"
    assert [m["key"] for m in models] == [key] and models[0]["test_accuracy"]["real"] > 0.5, models
    net, classes = load_model(storage.read_bytes(Layout(WEB_RUN).train_model("train-synthetic", 0)))
    for domain in ("real", "synthetic"):
        table = load_split_table(storage, WEB_RUN, domain, "test")
        blobs = table.column("image").to_pylist()
        # The train stage's scoring: the whole split in one call, its own TTA level and precision.
        expected = torch.softmax(logits(net, decode_images(table), 256, web_run.train.tta_level, torch.device("cpu"), web_run.train.precision), 1)
        for i, data in enumerate(blobs):
            r = client.post("/api/classify", data={"model": key, "image": (io.BytesIO(data), "x.png")}, content_type="multipart/form-data")
            assert r.status_code == 200, r.get_json()
            got = {c["name"]: c["probability"] for c in r.get_json()["classes"]}
            assert r.get_json()["predicted"] == classes[int(expected[i].argmax())]
            assert np.allclose([got[c] for c in classes], expected[i].numpy(), atol=1e-4), (domain, i)
    # A larger, non-square upload (a test image x3, with 16 rows of noise above and below) is
    # centre-cropped and resized as the dataset stage does a photograph; a JPEG is read too.
    from synth.dataset import Item, normalize_image
    from synth.images import decode_png

    rng = np.random.default_rng(0)
    for data in load_split_table(storage, WEB_RUN, "real", "test").column("image").to_pylist()[:8]:
        big = np.asarray(Image.open(io.BytesIO(data)).resize((96, 96), Image.Resampling.NEAREST))
        big = np.concatenate([rng.integers(0, 256, (16, 96, 3), dtype=np.uint8), big, rng.integers(0, 256, (16, 96, 3), dtype=np.uint8)])
        seen = decode_png(normalize_image(Item("u", 0, "", "u", data=png_bytes(big)), 32))[None]
        want = logits(net, seen, 1, web_run.train.tta_level, torch.device("cpu"), web_run.train.precision).argmax(1)
        r = client.post("/api/classify", data={"model": key, "image": (io.BytesIO(png_bytes(big)), "x.png")})
        assert r.get_json()["predicted"] == classes[int(want)] and decode_png(base64.b64decode(r.get_json()["image_png_base64"])).tolist() == seen[0].tolist()
        r = client.post("/api/classify", data={"model": key, "image": (io.BytesIO(png_bytes(big, "JPEG")), "x.jpg")})
        assert r.status_code == 200 and r.get_json()["input"] == {"format": "JPEG", "width": 96, "height": 128}


# --------------------------------------------------------------------------------------------
# Generate: the batch stage's generator and prompts; the tiny diffusers pipeline; the queue
# --------------------------------------------------------------------------------------------


def test_class_and_technique_reproduce_the_batch_image(web_run, client):
    from synth.images import decode_png

    storage = Storage(web_run.storage.root)
    manifest = storage.read_parquet(Layout(WEB_RUN).generate_manifest, columns=["id", "shard"]).to_pylist()
    shard_of = {r["id"]: r["shard"] for r in manifest}
    for cls in ("cat", "frog"):
        r = client.post("/api/generate", json={"class": cls, "technique": "environment"})
        body = r.get_json()
        assert r.status_code == 200 and body["class_name"] == cls and body["technique"] == "environment", body
        stored = storage.read_parquet(Layout(WEB_RUN).generate_shard(shard_of[body["batch_id"]]), columns=["id", "image"]).to_pylist()
        image = next(row["image"] for row in stored if row["id"] == body["batch_id"])
        assert np.array_equal(decode_png(base64.b64decode(body["small_png_base64"])), decode_png(image)), "not the batch stage's image"
    # With a seed: the same seed gives the same prompt and image; another seed, another image.
    a, b, c = (client.post("/api/generate", json={"class": "dog", "technique": "domain", "seed": s}).get_json() for s in (7, 7, 8))
    assert a["image_png_base64"] == b["image_png_base64"] != c["image_png_base64"] and a["prompt"] == b["prompt"]
    assert client.post("/api/generate", json={"class": "dog", "technique": "llm"}).status_code == 400  # smoke writes no LLM prompts
    assert client.post("/api/generate", json={"class": "whale"}).status_code == 400
    refused = client.post("/api/generate", json={"prompt": "a photo of a sofa"})  # the class-aware generator needs a class
    assert refused.status_code == 400 and "generator refused" in refused.get_json()["error"]


def test_tiny_diffusers_pipeline_generates_and_saves(web_run, tiny_sd):
    from synth.images import decode_png

    client = client_with_token(app_for(web_run, f"generate.model={tiny_sd}"))
    r = client.post("/api/generate", json={"prompt": "a photo of a cat on a sofa", "seed": 5, "save_run": "playground"})
    body = r.get_json()
    assert r.status_code == 200, body
    assert (body["width"], body["height"], body["image_size"]) == (64, 64, 32) and body["seed"] == 5
    again = client.post("/api/generate", json={"prompt": "a photo of a cat on a sofa", "seed": 5}).get_json()
    assert again["image_png_base64"] == body["image_png_base64"], "same prompt and seed, same image"
    saved = client.get(body["saved"]["url"])
    assert saved.status_code == 200 and np.array_equal(decode_png(saved.data), decode_png(base64.b64decode(body["image_png_base64"])))
    listed = client.get("/api/runs/playground/generated").get_json()["images"]
    assert [(i["id"], i["prompt"], i["seed"]) for i in listed] == [(body["saved"]["id"], "a photo of a cat on a sofa", 5)]
    # Over the text encoder's 77 tokens: refused with the count, never cut.
    r = client.post("/api/generate", json={"prompt": "a cat " * 60})
    assert r.status_code == 400 and "CLIP tokens" in r.get_json()["error"]


class BlockingGenerator:
    """Holds every batch until released: the queue's capacity and timeout become observable."""

    release = threading.Event()
    started = threading.Event()

    def generate(self, prompts, negatives, seeds, guidance_scales=None):
        from synth.images import GeneratedImages

        self.started.set()
        self.release.wait(30)
        return GeneratedImages(small=np.zeros((len(prompts), 32, 32, 3), np.uint8))


def test_a_full_queue_answers_503_with_retry_after_and_a_wait_times_out(web_run):
    BlockingGenerator.release.clear()
    app = app_for(web_run, "generate.generator=synth.testkit:ClassAwareTestGenerator", "web.queue_size=1", "web.generate_timeout_s=20",
                  generator_factory=BlockingGenerator)  # fmt: skip
    client = client_with_token(app)
    answers: dict[str, int] = {}

    def ask(name: str) -> None:
        answers[name] = client.post("/api/generate", json={"prompt": f"a cat {name}"}).status_code

    first = threading.Thread(target=ask, args=("running",))
    first.start()
    assert BlockingGenerator.started.wait(10)
    second = threading.Thread(target=ask, args=("queued",))
    second.start()
    time.sleep(0.5)  # the second waits in the queue's one place
    tick = time.perf_counter()
    r = client.post("/api/generate", json={"prompt": "a cat beyond the queue"})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and time.perf_counter() - tick < 2, "refused at once, not a hang"
    BlockingGenerator.release.set()
    first.join(10)
    second.join(10)
    assert answers == {"running": 200, "queued": 200}

    BlockingGenerator.release.clear()
    short = client_with_token(app_for(web_run, "generate.generator=synth.testkit:ClassAwareTestGenerator", "web.generate_timeout_s=0.5",
                                      generator_factory=BlockingGenerator))  # fmt: skip
    tick = time.perf_counter()
    r = short.post("/api/generate", json={"prompt": "a cat"})
    assert r.status_code == 503 and "no image within 0.5 s" in r.get_json()["error"] and time.perf_counter() - tick < 5
    BlockingGenerator.release.set()


# --------------------------------------------------------------------------------------------
# Browse
# --------------------------------------------------------------------------------------------


def test_browse_runs_samples_and_report(web_run, client):
    from synth.dataset import load_split_table

    runs = {r["name"]: r for r in client.get("/api/runs").get_json()["runs"]}
    assert runs[WEB_RUN]["report"] and runs[WEB_RUN]["stages"] == ["curate", "dataset", "generate", "prompts", "report", "train"]
    details = client.get(f"/api/runs/{WEB_RUN}").get_json()
    assert details["review"] and details["splits"]["synthetic"] == ["train", "val", "test"] and details["summaries"]["generate"]
    page = client.get(f"/runs/{WEB_RUN}")
    assert page.status_code == 200 and b"train-synthetic" in page.data and b"Review curation" in page.data
    assert client.get("/").status_code == 200 and WEB_RUN.encode() in client.get("/").data

    table = load_split_table(Storage(web_run.storage.root), WEB_RUN, "synthetic", "train")
    rows = table.select(["id", "class_name", "technique"]).to_pylist()
    r = client.get(f"/api/runs/{WEB_RUN}/samples?domain=synthetic&split=train&class=cat&technique=environment&limit=500").get_json()
    want = [x["id"] for x in rows if x["class_name"] == "cat" and x["technique"] == "environment"]
    assert [i["id"] for i in r["items"]] == want and r["total"] == len(want) > 0
    assert set(r["classes"]) == {x["class_name"] for x in rows}
    image = client.get(r["items"][0]["url"])
    assert image.status_code == 200 and image.data == table.column("image")[[x["id"] for x in rows].index(want[0])].as_py()
    paged = client.get(f"/api/runs/{WEB_RUN}/samples?domain=synthetic&split=train&offset=3&limit=2").get_json()
    assert [i["id"] for i in paged["items"]] == [x["id"] for x in rows[3:5]]
    assert client.get(f"/runs/{WEB_RUN}/samples").status_code == 200

    report = client.get(f"/runs/{WEB_RUN}/report")
    assert report.status_code == 200 and b"<html" in report.data.lower() and "default-src 'none'" in report.headers["Content-Security-Policy"]


# --------------------------------------------------------------------------------------------
# Review: decisions persist in the curation decision log; undo restores
# --------------------------------------------------------------------------------------------


def test_review_queue_decisions_relabel_and_undo_persist_in_the_log(web_run, client):
    from synth.curate import read_scores
    from synth.review import build_queue, curation_state, read_decisions

    storage = Storage(web_run.storage.root)
    classes = list(web_run.prompts.classes)
    scores = read_scores(storage, WEB_RUN)
    q = client.get(f"/api/runs/{WEB_RUN}/review/queue?order=score&class=cat&limit=500").get_json()
    expected = build_queue(scores, "score", classes, only=["cat"]).column("id").to_pylist()
    assert [i["id"] for i in q["items"]] == expected, "lowest CLIP score first, as the review stage orders it"
    sims = [i["similarity"] for i in q["items"]]
    assert sims == sorted(sims) and all(i["thumbnail"].startswith("data:image/png;base64,") for i in q["items"])
    assert client.get(f"/runs/{WEB_RUN}/review").status_code == 200

    before = curation_state(storage, WEB_RUN, classes)
    a, b, c, d = expected[:4]
    r = client.post(f"/api/runs/{WEB_RUN}/review/decisions", json={"reviewer": "ada", "decisions": [
        {"id": a, "decision": "accept"}, {"id": b, "decision": "reject"}, {"id": c, "decision": "relabel", "class": "dog"}]})  # fmt: skip
    assert r.status_code == 200 and r.get_json()["recorded"] == 3
    first = r.get_json()["submission"]
    state = curation_state(storage, WEB_RUN, classes)
    assert (state.accepted[a], state.accepted[b], state.accepted[c], state.relabel[c]) == (True, False, True, "dog")
    second = client.post(f"/api/runs/{WEB_RUN}/review/decisions", json={"reviewer": "ada", "decisions": [{"id": a, "decision": "reject"}]}).get_json()["submission"]
    # A bad submission is refused whole: nothing written.
    n = len(read_decisions(storage, WEB_RUN))
    bad = client.post(f"/api/runs/{WEB_RUN}/review/decisions", json={"reviewer": "ada", "decisions": [
        {"id": d, "decision": "accept"}, {"id": d, "decision": "relabel", "class": "whale"}]})  # fmt: skip
    assert bad.status_code == 400 and "whale" in bad.get_json()["error"] and len(read_decisions(storage, WEB_RUN)) == n
    # The queue shows the latest decision in place.
    shown = {i["id"]: i["decision"] for i in client.get(f"/api/runs/{WEB_RUN}/review/queue?class=cat&limit=500").get_json()["items"]}
    assert shown[a]["decision"] == "reject" and shown[c] == {"decision": "relabel", "class": "dog", "reviewer": "ada"}
    # Undo the second: a back to accept (the first submission); undo the first: back to the filter's verdicts.
    assert client.post(f"/api/runs/{WEB_RUN}/review/undo", json={"reviewer": "ada", "submission": second}).get_json()["restored"] == 1
    assert curation_state(storage, WEB_RUN, classes).accepted[a] is True
    assert client.post(f"/api/runs/{WEB_RUN}/review/undo", json={"reviewer": "ada", "submission": first}).get_json()["restored"] == 3
    after = curation_state(storage, WEB_RUN, classes)
    assert after.accepted == before.accepted and after.relabel == before.relabel
    log = client.get(f"/api/runs/{WEB_RUN}/review/log").get_json()
    assert log["total"] == 3 + 1 + 1 + 3 and log["recent"][0]["reviewer"] == "ada"
    undecided = client.get(f"/api/runs/{WEB_RUN}/review/queue?class=cat&undecided=1&limit=500").get_json()
    assert {a, b, c}.isdisjoint(i["id"] for i in undecided["items"])


# --------------------------------------------------------------------------------------------
# Hardening
# --------------------------------------------------------------------------------------------


def test_uploads_are_checked_before_decoding_and_size_limits_are_exact(web_run):
    limit = 65536
    client = client_with_token(app_for(web_run, f"web.max_upload_bytes={limit}", "web.max_image_side=4096", "web.max_image_pixels=4000000"))
    key = f"{WEB_RUN}/train-synthetic/seed-0"

    def classify(data: bytes, name: str = "x.png"):
        return client.post("/api/classify", data={"model": key, "image": (io.BytesIO(data), name)})

    rng = np.random.default_rng(0)
    png = png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    exact = png + b"\0" * (limit - len(png))  # trailing bytes after IEND: still a valid PNG
    assert classify(exact).status_code == 200
    over = classify(exact + b"\0")
    assert over.status_code == 413 and str(limit) in over.get_json()["error"]
    assert classify(b"\0" * (limit * 4)).status_code == 413  # over the request limit too

    def status(data: bytes) -> tuple[int, str]:
        r = classify(data)
        return r.status_code, r.get_json()["error"]

    bomb, wide = io.BytesIO(), io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # ~60 KB of zeros decoding to 400 megapixels
    Image.new("1", (3000, 3000)).save(wide, format="PNG")  # under Pillow's own bomb limit, over this app's
    for data, words in [
        (b"", "empty"),
        (b"GIF89a" + png[6:], "not a PNG, JPEG, WEBP image"),
        (png_bytes(np.zeros((8, 8, 3), np.uint8), "BMP"), "not a PNG, JPEG, WEBP image"),
        (png[: len(png) // 2], "damaged or truncated"),
        (png[:100] + bytes([png[100] ^ 0xFF]) + png[101:], "damaged or truncated"),
        (bomb.getvalue(), "decompression bomb"),
        (wide.getvalue(), "3000 x 3000 px"),
    ]:
        code, error = status(data)
        assert code == 400 and words in error, (code, error)
    assert client.post("/api/classify", data={"model": key}).status_code == 400  # no file
    assert classify(png, "x.png").status_code == 200
    for model in ("../etc/passwd", f"{WEB_RUN}/../x/seed-0", "a/b/seed-x", f"{WEB_RUN}/train-synthetic/seed-9"):
        r = client.post("/api/classify", data={"model": model, "image": (io.BytesIO(png), "x.png")})
        assert r.status_code in (400, 404) and "error" in r.get_json(), model


def test_names_csrf_and_errors_are_clear_4xx(web_run):
    app = app_for(web_run)
    plain = app.test_client()
    assert plain.post("/api/generate", json={"prompt": "a cat"}).status_code == 403  # no token
    client = client_with_token(app)
    bad_token = app.test_client()
    bad_token.get("/api/csrf")
    assert bad_token.post("/api/generate", json={"prompt": "a cat"}, headers={"X-CSRF-Token": "forged"}).status_code == 403
    for path in ["/api/runs/..", "/api/runs/%2e%2e", "/api/runs/a%2Fb", "/api/runs/.hidden", f"/api/runs/{WEB_RUN}/samples?domain=../x",
                 f"/api/runs/{WEB_RUN}/samples?split=secret", f"/api/runs/{WEB_RUN}/samples?limit=-1", f"/api/runs/{WEB_RUN}/samples?offset=x",
                 f"/api/runs/{WEB_RUN}/dataset/synthetic/train/..%2F..%2Fx.png", f"/api/runs/{WEB_RUN}/generated/nope.png",
                 f"/api/runs/{WEB_RUN}/review/queue?order=random", "/api/runs//samples", f"/api/runs/{WEB_RUN}//samples", "/runs/nope/review", "/runs/nope/report", "/nowhere"]:  # fmt: skip
        r = client.get(path)
        assert 400 <= r.status_code < 500, (path, r.status_code)
        if path.startswith("/api/"):
            assert r.get_json()["error"], path
        assert b"Traceback" not in r.data
    for body in [None, [], "text", {"prompt": ""}, {"prompt": "x", "class": "cat"}, {"seed": -1, "prompt": "x"}, {"seed": "1e9", "prompt": "x"},
                 {"prompt": "a\x00cat"}, {"prompt": "a cat", "save_run": "../../etc"}]:  # fmt: skip
        r = client.post("/api/generate", json=body)
        assert r.status_code == 400 and r.get_json()["error"], body
    assert client.put("/api/generate").status_code == 405


def test_the_app_reads_its_config_from_the_environment(web_run, monkeypatch):
    from synth.web import create_app

    monkeypatch.setenv("SYNTH_CONFIG", str(REPO / "configs" / "smoke.yaml"))
    monkeypatch.setenv("SYNTH_OVERRIDES", f"storage.root={web_run.storage.root} web.queue_size=3")
    app = create_app()
    assert app.extensions["synth"]["cfg"].web.queue_size == 3
    assert WEB_RUN in [r["name"] for r in app.test_client().get("/api/runs").get_json()["runs"]]


def test_an_s3_root_serves_the_same_run(web_run, s3_server):
    from conftest import make_bucket

    make_bucket(s3_server, "webapp")
    local = Storage(web_run.storage.root)
    remote = Storage("s3://webapp/runs", s3_endpoint_url=s3_server)
    for key in local.list(WEB_RUN):
        if "/ray/" not in key:  # all but Ray Train's checkpoints
            remote.write_bytes(key, local.read_bytes(key))
    client = client_with_token(app_for(web_run, "storage.root=s3://webapp/runs", f"storage.s3_endpoint_url={s3_server}"))
    assert [r["name"] for r in client.get("/api/runs").get_json()["runs"]] == [WEB_RUN]
    key = client.get("/api/models").get_json()["models"][0]["key"]
    png = png_bytes(np.full((32, 32, 3), 90, np.uint8))
    assert client.post("/api/classify", data={"model": key, "image": (io.BytesIO(png), "x.png")}).status_code == 200
    q = client.get(f"/api/runs/{WEB_RUN}/review/queue?limit=3").get_json()
    assert len(q["items"]) == 3 and all(i["thumbnail"] for i in q["items"])
    r = client.post(f"/api/runs/{WEB_RUN}/review/decisions", json={"reviewer": "s3", "decisions": [{"id": q["items"][0]["id"], "decision": "reject"}]})
    assert r.status_code == 200 and remote.list(f"{WEB_RUN}/curate/decisions")


def test_gunicorn_serves_the_app_as_the_image_does(web_run, tmp_path):
    """The Docker image's command, with its gunicorn config, on this run's storage."""
    import json
    import os
    import subprocess
    import sys
    import urllib.request

    from conftest import free_port

    port = free_port()
    env = {**os.environ, "PORT": str(port), "SYNTH_CONFIG": str(REPO / "configs" / "smoke.yaml"),
           "SYNTH_OVERRIDES": f"storage.root={web_run.storage.root}", "SYNTH_SECRET_KEY": "test"}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", "docker/gunicorn.conf.py", "synth.web:create_app()"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline, runs = time.time() + 90, None
        while time.time() < deadline and runs is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5) as r:
                    runs = json.load(r)["runs"]
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        assert runs is not None and WEB_RUN in [r["name"] for r in runs]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/runs/{WEB_RUN}/review", timeout=10) as r:
            assert r.status == 200 and b"Review curation" in r.read()
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert "GET /api/runs" in out, out[-2000:]  # the access log goes to stdout
