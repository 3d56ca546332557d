"""Gunicorn settings for the web app: `gunicorn --config docker/gunicorn.conf.py 'synth.web:create_app()'`.

The image's default command. Environment: PORT (8000), GUNICORN_THREADS (8), GUNICORN_TIMEOUT (180 s).
"""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"

# One process: the models live in its memory (one copy of each, loaded once) and the app's one
# generator queue must be the only one. Threads serve the pages and the queued requests meanwhile;
# more of them than the generator's queue (web.queue_size, 4) has places keeps pages answering
# while the queue is full.
workers = 1
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))

# Above the generator's wait (web.generate_timeout_s, 120 s by default): a request that waits for
# its image is answered by the app (503 when it is late), never cut by gunicorn. Raise it with
# GUNICORN_TIMEOUT where web.generate_timeout_s is raised.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "180"))
graceful_timeout = timeout

# Access and error logs to the container's stdout / stderr.
accesslog = "-"
errorlog = "-"
# The worker's heartbeat file in memory: a container's /tmp may sit on a slow overlay filesystem.
worker_tmp_dir = "/dev/shm"
