# Image for the Ray cluster nodes and the web app.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HOME=/models/hf
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first, so code changes rebuild only the last layers.
COPY pyproject.toml README.md ./
RUN mkdir synth ray_jobs && touch synth/__init__.py ray_jobs/__init__.py && pip install ".[test]" && pip uninstall -y synth
COPY . .
RUN pip install --no-deps -e .

# Pre-fetch the default model at build time where the Hub is reachable:
#   docker build --build-arg PREFETCH=stabilityai/sd-turbo .
ARG PREFETCH=""
RUN if [ -n "$PREFETCH" ]; then python -c "from diffusers import AutoPipelineForText2Image as P; P.from_pretrained('$PREFETCH')"; fi

CMD ["python", "-m", "ray_jobs.pipeline", "configs/smoke.yaml"]
