"""The web app in a real browser, used as a person would: Playwright driving Debian's Chromium.

The app is served for real (werkzeug's threaded server on 127.0.0.1) on a copy of the session's
finished run, and each test checks what the page shows, not only what the server answered:
browse the runs and the dataset, generate and save an image, classify an upload, review
curation with the keyboard (each step also checked in the decision log), and a missing run.
Each page is saved as a full-page screenshot at its key moment in
``test-artifacts/screenshots/`` at the repository root, for a human look.

Skipped when /usr/bin/chromium (``apt-get install chromium``) or playwright is missing.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from conftest import REPO, WEB_RUN, client_with_token, copy_of_run, free_port, png_bytes
from synth.storage import Storage

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium: install Debian's chromium (apt-get install chromium) to run the browser tests", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (it is in the test extras)")
expect = sync_api.expect
expect.set_options(timeout=15_000)  # a classification on two busy shared cores can take seconds

SHOTS = REPO / "test-artifacts" / "screenshots"
MODEL = f"{WEB_RUN}/train-synthetic/seed-0"


@pytest.fixture(scope="module")
def cfg(web_run, tmp_path_factory):
    """The run's own config on a copy of its storage: the walk's decisions and saves stay here."""
    return copy_of_run(web_run, tmp_path_factory.mktemp("browser") / "runs")


@pytest.fixture(scope="module")
def app(cfg):
    from synth.web import create_app

    return create_app(cfg, secret_key="test")


@pytest.fixture(scope="module")
def base_url(app):
    """The app served for real, as `flask run` would, on a free port; shut down after the module."""
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request would bury a failure's own output
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="web-test-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh browser tab (own cookies and local storage); a script error on any page fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def image_width(locator) -> int:
    """The decoded width of an <img>, once it has loaded (0: broken or not loaded)."""
    locator.evaluate("img => img.complete || new Promise(done => { img.onload = img.onerror = done; })")
    return locator.evaluate("img => img.naturalWidth")


# --------------------------------------------------------------------------------------------
# Runs and the dataset
# --------------------------------------------------------------------------------------------


def test_browse_the_run_its_dataset_and_report(page, base_url, cfg):
    storage = Storage(cfg.storage.root)
    page.goto(base_url + "/")
    expect(page.locator("h1")).to_have_text("Runs")
    link = page.locator("#runs a", has_text=WEB_RUN)
    expect(link).to_be_visible()
    shot(page, "index.png")

    # 1. The run: its stages with their summaries, its trained model with test accuracy.
    link.click()
    expect(page.locator("h1")).to_contain_text(WEB_RUN)
    stages = page.locator("#stages tbody tr td:first-child").all_inner_texts()
    assert stages == ["curate", "dataset", "generate", "prompts", "report", "train"], stages
    expect(page.locator("#stages tbody tr", has_text="generate")).to_contain_text("images")
    model = page.locator("#models tbody tr")
    expect(model).to_have_count(1)
    expect(model).to_contain_text("train-synthetic / seed 0")
    expect(model).to_contain_text(re.compile(r"real: \d+\.\d%"))
    shot(page, "run.png")

    # 2. The dataset: a grid of images; a class filter leaves that class only; the next page.
    page.get_by_role("link", name="Browse the dataset").click()
    tiles = page.locator("#samples figure")
    expect(tiles.first).to_be_visible()
    assert image_width(tiles.first.locator("img")) == 32
    page.select_option("#domain", "real")
    expect(page.locator("#count")).to_have_text("1–48 of 96")
    expect(tiles).to_have_count(48)
    first_page = tiles.first.get_attribute("data-id")
    page.click("#next")
    expect(page.locator("#count")).to_have_text("49–96 of 96")
    expect(tiles.first).not_to_have_attribute("data-id", first_page)
    assert image_width(tiles.first.locator("img")) == 32
    page.select_option("#cls", "cat")
    expect(page.locator("#count")).to_have_text("1–16 of 16")
    captions = page.locator("#samples figcaption").all_inner_texts()
    assert len(captions) == 16 and all(c == "cat" for c in captions), captions
    from synth.dataset import load_split_table

    table = load_split_table(storage, WEB_RUN, "real", "train")
    want = [i for i, c in zip(table.column("id").to_pylist(), table.column("class_name").to_pylist()) if c == "cat"]
    assert [t.get_attribute("data-id") for t in tiles.all()] == want
    page.select_option("#cls", "")
    page.select_option("#domain", "synthetic")
    page.select_option("#technique", "environment")
    table = load_split_table(storage, WEB_RUN, "synthetic", "train")
    n = table.column("technique").to_pylist().count("environment")
    expect(page.locator("#count")).to_have_text(f"1–{n} of {n}")
    captions = page.locator("#samples figcaption").all_inner_texts()
    assert len(captions) == n and all(re.fullmatch(r"\w+ · environment( · rejected)?", c) for c in captions), captions
    shot(page, "samples.png")

    # 3. The report opens as its own document.
    page.goto(f"{base_url}/runs/{WEB_RUN}")
    page.get_by_role("link", name="Report").first.click()
    expect(page.locator("h1").first).to_have_text(f"synth report: run {WEB_RUN}")
    assert page.url.endswith(f"/runs/{WEB_RUN}/report")
    shot(page, "report.png")


# --------------------------------------------------------------------------------------------
# Generate
# --------------------------------------------------------------------------------------------


def test_generate_a_class_a_typed_prompt_and_save_into_a_run(page, base_url, cfg):
    def meta() -> dict[str, str]:
        keys = page.locator("#result-meta dt").all_inner_texts()
        return dict(zip(keys, page.locator("#result-meta dd").all_inner_texts()))

    page.goto(base_url + "/generate")
    # 1. A class and a technique: the image appears with its prompt and seed.
    page.select_option("#class", "frog")
    page.select_option("#technique", "environment")
    page.click("#generate-button")
    image = page.locator("#result-image")
    expect(page.locator("#toast")).to_have_text("Done")
    assert image.get_attribute("src").startswith("data:image/png;base64,") and image_width(image) == cfg.generate.width
    caption = page.locator("#result-caption").inner_text()
    assert "frog" in caption.lower(), caption
    shown = meta()
    assert shown["class"] == "frog" and shown["technique"] == "environment" and shown["seed"].isdigit() and shown["saved"] == "no", shown
    shot(page, "generate.png")

    # 2. A typed prompt, with a seed (the test kit's generator draws the class a prompt names).
    page.check('input[name="mode"][value="prompt"]')
    expect(page.locator("#class")).to_be_disabled()
    prompt = "a photo of a horse in the snow"
    page.fill("#prompt", prompt)
    page.fill("#seed", "42")
    page.click("#generate-button")
    expect(page.locator("#result-caption")).to_have_text(prompt)
    expect(page.locator("#result-meta")).to_contain_text("(typed prompt)")
    assert meta()["seed"] == "42" and image_width(image) == cfg.generate.width
    shot(page, "generate-typed.png")

    # 3. Saved into a run: the toast names it, and that run's page shows the image.
    page.fill("#save_run", "browser-saves")
    page.click("#generate-button")
    expect(page.locator("#toast")).to_contain_text("Saved as web-")
    saved_id = page.locator("#toast").inner_text().removeprefix("Saved as ")
    assert meta()["saved"].endswith(f"browser-saves/web/generated/{saved_id}.png")
    page.goto(f"{base_url}/runs/browser-saves")
    tile = page.locator(".grid figure.tile")
    expect(tile).to_have_count(1)
    expect(tile.locator("figcaption")).to_have_text(f"{prompt} · seed 42")
    assert tile.locator("img").get_attribute("src") == f"/api/runs/browser-saves/generated/{saved_id}.png" and image_width(tile.locator("img")) == cfg.generate.width
    shot(page, "run-saved.png")


# --------------------------------------------------------------------------------------------
# Classify
# --------------------------------------------------------------------------------------------


def test_classify_an_upload_shows_every_class_and_the_api_prediction(page, base_url, app, cfg, tmp_path):
    import io

    from synth.dataset import decode_images, load_split_table

    photo = decode_images(load_split_table(Storage(cfg.storage.root), WEB_RUN, "real", "test"))[5]
    upload = tmp_path / "photo.png"
    upload.write_bytes(png_bytes(photo))
    api = client_with_token(app).post("/api/classify", data={"model": MODEL, "image": (io.BytesIO(upload.read_bytes()), "photo.png")}).get_json()

    page.goto(base_url + "/classify")
    page.select_option("#model", MODEL)
    page.set_input_files("#image", str(upload))
    page.click("#classify-button")
    rows = page.locator("#probabilities tr")
    expect(rows).to_have_count(len(cfg.prompts.classes))
    assert sorted(r.get_attribute("data-cls") for r in rows.all()) == sorted(cfg.prompts.classes)
    assert [r.get_attribute("data-cls") for r in rows.all()] == [c["name"] for c in api["classes"]], "highest first, as the API ranks them"
    predicted = page.locator("#predicted").inner_text()
    assert predicted.startswith(api["predicted"] + " ("), (predicted, api["predicted"])
    assert image_width(page.locator("#input-image")) == 32
    shot(page, "classify.png")

    # Not an image: the page says why, in words.
    text = tmp_path / "notes.png"
    text.write_bytes(b"just some text")
    page.set_input_files("#image", str(text))
    page.click("#classify-button")
    expect(page.locator("#toast.error")).to_contain_text("not a PNG, JPEG, WEBP image")


# --------------------------------------------------------------------------------------------
# Review with the keyboard
# --------------------------------------------------------------------------------------------


def test_review_with_the_keyboard_persists_in_the_decision_log(page, base_url, app, cfg):
    from synth.review import curation_state, read_decisions

    storage = Storage(cfg.storage.root)
    classes = list(cfg.prompts.classes)
    queue = client_with_token(app).get(f"/api/runs/{WEB_RUN}/review/queue?order=score&limit=48").get_json()["items"]
    class_of = {i["id"]: i["class_name"] for i in queue}
    ids = [i["id"] for i in queue]
    logged = len(read_decisions(storage, WEB_RUN))

    def new_decisions():
        return sorted(read_decisions(storage, WEB_RUN), key=lambda d: d.sort_key())[logged:]

    def tile(image_id: str):
        return page.locator(f'#queue .tile[data-id="{image_id}"]')

    def focused() -> int:
        return int(page.locator("#queue .tile.focused").get_attribute("data-index"))

    page.goto(f"{base_url}/runs/{WEB_RUN}/review")
    expect(page.locator("#queue .tile")).to_have_count(48)
    assert [t.get_attribute("data-id") for t in page.locator("#queue .tile").all()] == ids, "the API's queue, in its order"
    page.fill("#reviewer", "ada")
    page.locator("#queue").focus()  # out of the text field: keys now review

    # 1. Arrows move the focus (down: one row of the grid).
    columns = page.evaluate("() => { const t = [...document.querySelectorAll('#queue .tile')]; return t.filter(x => x.offsetTop === t[0].offsetTop).length; }")
    assert columns > 1 and focused() == 0
    page.keyboard.press("ArrowRight")
    assert focused() == 1
    page.keyboard.press("ArrowDown")
    assert focused() == 1 + columns
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowUp")
    assert focused() == 0

    # 2. y accepts the focused image and moves on; n rejects; a digit relabels in place.
    a, b, c = ids[0], ids[1], ids[2]
    page.keyboard.press("y")
    expect(tile(a).locator(".badge")).to_have_text("accepted")
    assert focused() == 1
    assert [(d.id, d.decision, d.reviewer) for d in new_decisions()] == [(a, "accept", "ada")]
    page.keyboard.press("n")
    expect(tile(b).locator(".badge")).to_have_text("rejected")
    assert focused() == 2 and new_decisions()[-1].id == b and curation_state(storage, WEB_RUN, classes).accepted[b] is False
    target = next(k for k in classes if k != class_of[c])
    page.keyboard.press(str(classes.index(target) + 1))
    expect(tile(c).locator(".badge")).to_have_text(f"→ {target}")
    state = curation_state(storage, WEB_RUN, classes)
    assert focused() == 3 and state.relabel[c] == target and state.accepted[c] is True
    assert [(d.id, d.decision) for d in new_decisions()] == [(a, "accept"), (b, "reject"), (c, "relabel")]

    # 3. Select several (click, then shift+click a range) and accept them at once: one submission.
    picked = ids[4:8]
    before = {i: tile(i).locator(".badge").inner_text() for i in picked}
    accepted_before = {i: curation_state(storage, WEB_RUN, classes).accepted[i] for i in picked}
    tile(picked[0]).click()
    tile(picked[-1]).click(modifiers=["Shift"])
    expect(page.locator("#selection")).to_have_text("4 selected")
    expect(page.locator("#queue .tile.selected")).to_have_count(4)
    shot(page, "review.png")
    page.locator("#queue").focus()
    page.keyboard.press("y")
    for i in picked:
        expect(tile(i).locator(".badge")).to_have_text("accepted")
    expect(page.locator("#queue .tile.selected")).to_have_count(0)
    batch = new_decisions()[3:]
    assert sorted(d.id for d in batch) == sorted(picked) and {d.decision for d in batch} == {"accept"}
    assert len({d.source for d in batch}) == 1, "one submission for the selection"

    # 4. u undoes the last decision (the whole selection): each image is back where it was.
    page.keyboard.press("u")
    expect(page.locator("#toast")).to_contain_text("undone: 4 images restored")
    state = curation_state(storage, WEB_RUN, classes)
    assert {i: state.accepted[i] for i in picked} == accepted_before
    for i in picked:
        # An image the filter had judged keeps its verdict, now as a decision of its own.
        restored = before[i] if not before[i].startswith("filter") else ("accepted" if accepted_before[i] else "rejected")
        expect(tile(i).locator(".badge")).to_have_text(restored)
    shot(page, "review-after-undo.png")

    # 5. A reload shows the decisions from the log.
    page.reload()
    expect(page.locator("#queue .tile")).to_have_count(48)
    expect(tile(a).locator(".badge")).to_have_text("accepted")
    expect(tile(b).locator(".badge")).to_have_text("rejected")
    expect(tile(c).locator(".badge")).to_have_text(f"→ {target}")
    assert page.locator("#reviewer").input_value() == "ada", "the reviewer's name is remembered"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_an_unknown_run_shows_a_readable_404(page, base_url):
    response = page.goto(base_url + "/runs/no-such-run")
    assert response.status == 404
    expect(page.locator("h1")).to_have_text("404")
    expect(page.locator("p.error")).to_contain_text("run 'no-such-run' has no outputs")
    expect(page.locator("p.error")).to_contain_text("Fix: pick a run from /api/runs")
    assert "Traceback" not in page.content()
    shot(page, "error-404.png")
    page.get_by_role("link", name="Back to the runs").click()
    expect(page.locator("h1")).to_have_text("Runs")
