"""The web app: generate, classify an upload with a trained model, browse runs, review curation.

``flask --app synth.web run`` locally; ``gunicorn --config docker/gunicorn.conf.py 'synth.web:create_app()'``
in the image. See :mod:`synth.web.app` for the routes and :mod:`synth.web.service` for the work.
"""

from synth.web.app import create_app

__all__ = ["create_app"]
