"""The Flask app: pages for people, a JSON API for every action (the pages use it).

Routes (``<run>`` and ids are checked names, see :func:`synth.web.service.check_name`):

- pages: ``/`` (runs), ``/generate``, ``/classify``, ``/runs/<run>`` (stages, models, links),
  ``/runs/<run>/samples`` (dataset by class and technique), ``/runs/<run>/review`` (only where
  the run has curate scores), ``/runs/<run>/report`` (the report stage's HTML);
- API: ``GET /api/csrf``, ``GET /api/health``, ``GET /api/runs``, ``GET /api/runs/<run>``,
  ``GET /api/runs/<run>/samples``, ``GET /api/runs/<run>/dataset/<domain>/<split>/<id>.png``,
  ``GET /api/models``, ``POST /api/classify``, ``GET /api/generate/options``, ``POST /api/generate``,
  ``GET /api/runs/<run>/generated``, ``GET /api/runs/<run>/generated/<id>.png``,
  ``GET /api/runs/<run>/review/queue``, ``POST /api/runs/<run>/review/decisions``,
  ``POST /api/runs/<run>/review/undo``, ``GET /api/runs/<run>/review/log``.

Every POST carries the session's CSRF token (header ``X-CSRF-Token`` or form field
``csrf_token``; ``GET /api/csrf`` hands one to API clients). Every error is JSON
``{"error": message}`` under ``/api`` and a short page elsewhere, with a 4xx status for anything
the client can fix; no traceback ever leaves the server.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request, session
from werkzeug.exceptions import HTTPException

from synth.config import Config, load_config
from synth.storage import Storage, StorageError
from synth.web import service
from synth.web.service import WebError

log = logging.getLogger(__name__)

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields around the one uploaded file

bp = Blueprint("web", __name__)


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


def create_app(config: "str | Path | Config | None" = None, overrides: Sequence[str] = (), *, generator_factory=None, secret_key: Optional[str] = None) -> Flask:
    """The app for one config: its storage root holds the runs; its generate section is the generator.

    Without arguments (``flask --app synth.web run``, gunicorn) it reads ``SYNTH_CONFIG`` (a
    preset, default ``configs/smoke.yaml`` in the working directory, as ``make smoke`` uses it), ``SYNTH_OVERRIDES`` (``key=value``
    words, shell-quoted) and ``SYNTH_SECRET_KEY`` (signs the session cookie that holds the CSRF
    token; a random one per process when unset).
    """
    if config is None:
        config = os.environ.get("SYNTH_CONFIG") or "configs/smoke.yaml"
        overrides = [*shlex.split(os.environ.get("SYNTH_OVERRIDES", "")), *overrides]
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    app = Flask(__name__)
    # An empty path segment ("/api/runs//samples") is a 404 with the usual JSON or page, not
    # Werkzeug's HTML redirect to the merged path, which named nothing a client could act on.
    app.url_map.merge_slashes = False
    key = secret_key or os.environ.get("SYNTH_SECRET_KEY")
    if not key:
        log.warning("web: SYNTH_SECRET_KEY is unset; sessions (and their CSRF tokens) last as long as this process")
    app.config.update(
        SECRET_KEY=key or secrets.token_hex(32),
        MAX_CONTENT_LENGTH=cfg.web.max_upload_bytes + FORM_OVERHEAD,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        JSON_SORT_KEYS=False,
    )
    storage = Storage.from_config(cfg.storage)
    app.extensions["synth"] = {
        "cfg": cfg,
        "storage": storage,
        "samples": service.Samples(storage),
        "classifier": service.Classifier(storage, cfg),
        "generation": service.Generation(storage, cfg, generator_factory),
        "review": service.Review(storage, cfg),
    }
    app.register_blueprint(bp)
    _register_errors(app)
    return app


def _ext(name: str) -> Any:
    return current_app.extensions["synth"][name]


# --------------------------------------------------------------------------------------------
# CSRF and errors
# --------------------------------------------------------------------------------------------


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


@bp.before_app_request
def _check_csrf() -> None:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    form = request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded")
    sent = request.headers.get("X-CSRF-Token") or (request.form.get("csrf_token") if form else None)
    expected = session.get("csrf")
    # As bytes: compare_digest refuses str holding non-ASCII (a forged header or field may hold any).
    if not sent or not expected or not hmac.compare_digest(str(sent).encode("utf-8", "replace"), str(expected).encode("utf-8", "replace")):
        raise WebError("missing or wrong CSRF token. Fix: reload the page (API clients: GET /api/csrf, then send its token as X-CSRF-Token with the same cookie)", 403)


@bp.app_context_processor
def _template_globals() -> dict:
    return {"csrf_token": csrf_token}


def _wants_json() -> bool:
    return request.path.startswith("/api/")


def _error(message: str, status: int, retry_after: Optional[int] = None) -> Response:
    if _wants_json():
        response = jsonify(error=message, status=status)
    else:
        response = Response(render_template("error.html", message=message, status=status), mimetype="text/html")
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _register_errors(app: Flask) -> None:
    @app.errorhandler(WebError)
    def web_error(exc: WebError):
        return _error(exc.message, exc.status, exc.retry_after)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        messages = {
            413: f"the request is over the upload limit of {_ext('cfg').web.max_upload_bytes} bytes. Fix: send a smaller image",
            404: "no such page or API route. Fix: start from / or /api/runs",
            405: f"{request.method} is not allowed here. Fix: see the API list in the README",
        }
        return _error(messages.get(exc.code, exc.description or exc.name), exc.code or 400)

    @app.errorhandler(StorageError)
    def storage_error(exc: StorageError):
        log.warning("web: storage error: %s", exc)
        return _error(f"storage is unavailable: {exc}. Fix: retry in a moment", 503, 5)

    @app.errorhandler(Exception)
    def internal(exc: Exception):
        log.exception("web: unexpected error on %s %s", request.method, request.path)
        return _error("internal error (logged on the server)", 500)


# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------


@bp.get("/")
def index():
    return render_template("index.html", runs=service.list_runs(_ext("storage")), root=_ext("storage").uri())


@bp.get("/generate")
def generate_page():
    return render_template("generate.html", options=_ext("generation").options(), runs=service.list_runs(_ext("storage")))


@bp.get("/classify")
def classify_page():
    storage = _ext("storage")
    models = [m for run in service.list_runs(storage) if "train" in run["stages"] for m in service.list_models(storage, run["name"])]
    return render_template("classify.html", models=models, max_bytes=_ext("cfg").web.max_upload_bytes)


@bp.get("/runs/<run>")
def run_page(run: str):
    storage = _ext("storage")
    return render_template("run.html", run=service.run_details(storage, run), saved=service.list_saved(storage, run)[:12])


@bp.get("/runs/<run>/samples")
def samples_page(run: str):
    details = service.run_details(_ext("storage"), run)
    if not details["splits"]:
        raise WebError(f"run {run!r} has no dataset yet. Fix: run the dataset stage for it", 404)
    return render_template("samples.html", run=details, page_size=_ext("cfg").web.page_size)


@bp.get("/runs/<run>/review")
def review_page(run: str):
    details = service.run_details(_ext("storage"), run)
    if not details["review"]:
        raise WebError(f"run {run!r} has no curate scores to review. Fix: run the curate stage for it", 404)
    return render_template("review.html", run=details, classes=_ext("review").classes(run), page_size=_ext("cfg").web.page_size)


@bp.get("/runs/<run>/report")
def report_page(run: str):
    service.require_run(_ext("storage"), run)
    key = service.report_key(run)
    if not _ext("storage").exists(key):
        raise WebError(f"run {run!r} has no report yet. Fix: run the report stage for it", 404)
    # The report is self-contained (plots inline); served as a document of its own.
    return Response(_ext("storage").read_bytes(key), mimetype="text/html", headers={"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"})


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def _json_body() -> Any:
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # json.loads's limit on nesting; silent=True covers only ValueError
        raise WebError("the JSON body is nested too deeply. Fix: send a flat JSON object") from None
    if body is None:
        if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return request.form.to_dict()
        raise WebError("send a JSON object (Content-Type: application/json)")
    return body


@bp.get("/api/csrf")
def api_csrf():
    return jsonify(csrf_token=csrf_token())


@bp.get("/api/health")
def api_health():
    gen = _ext("generation").queue
    return jsonify(ok=True, storage=_ext("storage").uri(), queued=gen.queued, generated=gen.generated)


@bp.get("/api/runs")
def api_runs():
    return jsonify(root=_ext("storage").uri(), runs=service.list_runs(_ext("storage")))


@bp.get("/api/runs/<run>")
def api_run(run: str):
    return jsonify(service.run_details(_ext("storage"), run))


@bp.get("/api/runs/<run>/samples")
def api_samples(run: str):
    a = request.args
    w = _ext("cfg").web
    return jsonify(
        _ext("samples").page(
            run, a.get("domain", "synthetic"), a.get("split", "train"), a.get("class") or None, a.get("technique") or None,
            service.parse_int(a.get("offset"), "offset", 0, 10**9, 0), service.parse_int(a.get("limit"), "limit", 1, 500, w.page_size),
        )
    )  # fmt: skip


@bp.get("/api/runs/<run>/dataset/<domain>/<split>/<image_id>.png")
def api_dataset_image(run: str, domain: str, split: str, image_id: str):
    data = _ext("samples").image(run, domain, split, image_id)
    return Response(data, mimetype="image/png", headers={"Cache-Control": "private, max-age=3600"})


@bp.get("/api/models")
def api_models():
    storage = _ext("storage")
    runs = service.list_runs(storage)
    return jsonify(models=[m for run in runs if "train" in run["stages"] for m in service.list_models(storage, run["name"])])


@bp.post("/api/classify")
def api_classify():
    upload = request.files.get("image")
    if upload is None:
        raise WebError("no image in the request. Fix: send multipart/form-data with the file in a field named 'image'")
    model = request.form.get("model")
    if not model:
        raise WebError("no model chosen. Fix: send the field 'model' with a key from /api/models")
    data = upload.stream.read(_ext("cfg").web.max_upload_bytes + 1)
    return jsonify(_ext("classifier").classify(model, data))


@bp.get("/api/generate/options")
def api_generate_options():
    return jsonify(_ext("generation").options())


@bp.post("/api/generate")
def api_generate():
    return jsonify(_ext("generation").generate(_dict(_json_body())))


@bp.get("/api/runs/<run>/generated")
def api_generated(run: str):
    service.check_name(run, "run")
    return jsonify(run=run, images=service.list_saved(_ext("storage"), run))


@bp.get("/api/runs/<run>/generated/<image_id>.png")
def api_generated_image(run: str, image_id: str):
    return Response(service.saved_image(_ext("storage"), run, image_id), mimetype="image/png")


@bp.get("/api/runs/<run>/review/queue")
def api_review_queue(run: str):
    a = request.args
    return jsonify(
        _ext("review").queue(
            run, a.get("order", "score"), a.get("class") or None, service.parse_int(a.get("offset"), "offset", 0, 10**9, 0),
            service.parse_int(a.get("limit"), "limit", 1, 500, _ext("cfg").web.page_size), a.get("undecided") in ("1", "true"),
        )
    )  # fmt: skip


@bp.post("/api/runs/<run>/review/decisions")
def api_review_decide(run: str):
    return jsonify(_ext("review").decide(run, _json_body()))


@bp.post("/api/runs/<run>/review/undo")
def api_review_undo(run: str):
    return jsonify(_ext("review").undo(run, _json_body()))


@bp.get("/api/runs/<run>/review/log")
def api_review_log(run: str):
    return jsonify(_ext("review").log(run, service.parse_int(request.args.get("limit"), "limit", 1, 1000, 50)))


def _dict(body: Any) -> dict:
    if not isinstance(body, dict):
        raise WebError("send a JSON object, e.g. {\"prompt\": \"a photo of a cat\"} or {\"class\": \"cat\", \"technique\": \"environment\"}")
    return body

